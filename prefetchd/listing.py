"""Where the keys of a dataset come from: a given index file, a concurrent S3 LIST, or a local walk.

Every source feeds `sink(key, size, etag)` (a `CatalogBuilder.add`). Sources, in order of preference:
1. an index file (local path or s3://bucket/key, optionally gzipped): a keys file (`aws s3 ls --recursive`
   lines or one bare key per line), an S3 Inventory CSV, or a load_data CSV/parquet;
2. a LIST partitioned by folder: `Delimiter='/'` LISTs descend to the plate folders, then each `Images/`
   and `illum/` folder is listed in full, with up to `s3.list_concurrency` requests in flight;
3. for `JUMPLocal`, a walk of the root with os.scandir (keys = paths relative to root).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable
from urllib.parse import unquote_plus

from prefetchd.errors import DatasetError, ErrorCode, StorageError
from prefetchd.layout import barcode_of
from prefetchd.s3 import make_s3_client

if TYPE_CHECKING:
    from prefetchd.dataset import DatasetSpec

Sink = Callable[[str, int, "str | None"], None]
Progress = Callable[[int, int, int], None]  # (done plates, total plates so far, keys seen)

LEAF_FOLDERS = ("Images/", "illum/")  # listed in full (no delimiter): all their keys are wanted
_LS_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +(\d+) (.+)")
_ETAG = re.compile(r'"?[0-9a-fA-F]{32}(-\d+)?"?')


# ---- S3 LIST ---------------------------------------------------------------------------------------

class PrefixWalker:
    """Concurrent LIST of everything under a prefix, one paginated LIST per leaf folder."""

    def __init__(self, client: Any, bucket: str, sink: Sink, concurrency: int, progress: Progress | None):
        self.client = client
        self.bucket = bucket
        self.sink = sink
        self.progress = progress
        self.requests = asyncio.Semaphore(max(1, concurrency))
        self.leaves_total = 0
        self.leaves_done = 0
        self.keys = 0

    async def run(self, prefix: str) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self.group = group
                group.create_task(self._visit(prefix))
        except ExceptionGroup as group_error:
            raise _first_leaf(group_error) from None

    async def _visit(self, prefix: str) -> None:
        """Delimiter LIST of one folder: keys go to the sink, subfolders are visited or listed in full."""
        for sub in await self._list(prefix, delimiter="/"):
            if _folder_name(sub) in LEAF_FOLDERS:
                self.leaves_total += 1
                self.group.create_task(self._list_leaf(sub))
            else:
                self.group.create_task(self._visit(sub))

    async def _list_leaf(self, prefix: str) -> None:
        await self._list(prefix, delimiter=None)
        self.leaves_done += 1
        self._report()

    async def _list(self, prefix: str, delimiter: str | None) -> list[str]:
        """All pages of one LIST; returns the common prefixes (subfolders)."""
        params = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        folders: list[str] = []
        while True:
            async with self.requests:
                page = await self.client.list_objects_v2(**params)
            for obj in page.get("Contents", ()):
                self.sink(obj["Key"], obj.get("Size", -1), obj.get("ETag"))
            self.keys += page.get("KeyCount", len(page.get("Contents", ())))
            folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))
            if not page.get("IsTruncated"):
                return folders
            params["ContinuationToken"] = page["NextContinuationToken"]
            self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.leaves_done, self.leaves_total, self.keys)


def _folder_name(prefix: str) -> str:
    """`a/b/Images/` → `Images/`."""
    return prefix[prefix.rstrip("/").rfind("/") + 1:]


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def list_root(spec: DatasetSpec) -> str:
    return f"{spec.prefix}/" if spec.prefix else ""


_IMAGE_IN_BATCH = re.compile(r"^(?P<batch_root>(?:.*/)?)images/(?P<plate>[^/]+)/Images/[^/]+$")


class _IllumOutsidePrefix:
    """Remembers the plates of image keys whose batch's `illum/` folder lies outside the listed prefix
    (a prefix pointing at one plate or its Images/ folder), so their illum files can be listed too."""

    def __init__(self, sink: Sink, root: str):
        self.sink = sink
        self.root = root
        self.folders: set[str] = set()

    def __call__(self, key: str, size: int, etag: str | None) -> None:
        self.sink(key, size, etag)
        match = _IMAGE_IN_BATCH.match(key)
        if match and not (match["batch_root"] + "illum/").startswith(self.root):
            self.folders.add(f"{match['batch_root']}illum/{barcode_of(match['plate'])}/")


async def list_s3(spec: DatasetSpec, s3cfg: dict, sink: Sink, progress: Progress | None = None) -> int:
    """LIST everything under the dataset prefix; returns the number of keys seen."""
    concurrency = int(s3cfg.get("list_concurrency", 16))
    root = list_root(spec)
    recorder = _IllumOutsidePrefix(sink, root)
    async with make_s3_client(s3cfg, max_pool=concurrency) as client:
        walker = PrefixWalker(client, spec.bucket, recorder, concurrency, progress)
        await walker.run(root)
        illum = PrefixWalker(client, spec.bucket, sink, concurrency, None)
        for folder in sorted(recorder.folders):
            await illum._list(folder, delimiter=None)
    return walker.keys


# ---- local directory -------------------------------------------------------------------------------

def walk_local(root: str, sink: Sink, progress: Progress | None = None) -> int:
    """Every file under root, as a path relative to root with '/' separators; returns the count."""
    if not os.path.isdir(root):
        raise StorageError(f"local dataset root {root} does not exist or is not a directory: fix root= in "
                           "the dataset string (or copy the data there with `aws s3 sync`)", code=ErrorCode.NO_ROOT)
    count = 0
    leaves = 0
    stack = [""]
    while stack:
        relative = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, relative)))
        except PermissionError:
            raise StorageError(f"cannot read {os.path.join(root, relative)}: permission denied; fix the "
                               "directory permissions or run as a user that can read it",
                               code=ErrorCode.NO_ROOT) from None
        for entry in entries:
            path = f"{relative}{entry.name}"
            if entry.is_dir(follow_symlinks=True):
                stack.append(path + "/")
            else:
                sink(path, -1, None)
                count += 1
        if relative.endswith(LEAF_FOLDERS):
            leaves += 1
            if progress is not None:
                progress(leaves, leaves, count)
    return count


# ---- index files -----------------------------------------------------------------------------------

async def open_index(source: str, s3cfg: dict) -> BinaryIO:
    """A binary stream over a local file or an s3://bucket/key object, gunzipped when compressed."""
    if source.startswith("s3://"):
        bucket, _, key = source[5:].partition("/")
        async with make_s3_client(s3cfg) as client:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                stream: BinaryIO = io.BytesIO(await body.read())
    else:
        try:
            stream = open(Path(source).expanduser(), "rb")  # noqa: SIM115 - closed by the reader
        except FileNotFoundError:
            raise DatasetError(f"index file {source} does not exist: fix index= in the dataset string "
                               "or --keys-file") from None
    if stream.read(2) == b"\x1f\x8b":
        stream.seek(0)
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    stream.seek(0)
    return stream


def parse_index_stream(stream: BinaryIO, spec: DatasetSpec, sink: Sink) -> int:
    """Detect the index format and feed its keys to sink; returns the number of keys."""
    with stream:
        buffered = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream
        head = buffered.peek(64 * 1024)
        if head[:4] == b"PAR1":
            return _load_data_parquet(buffered.read(), spec, sink)
        first_line = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        if "FileName_Orig" in first_line or "PathName_Orig" in first_line:
            return _load_data_csv(buffered.read(), spec, sink)
        text = io.TextIOWrapper(buffered, encoding="utf-8", newline="")
        if first_line.startswith('"'):
            return _inventory_csv(text, spec, sink)
        return _keys_file(text, spec, sink)


def _keep(key: str, spec: DatasetSpec) -> bool:
    return spec.storage.holds(key)


def _keys_file(text: io.TextIOBase, spec: DatasetSpec, sink: Sink) -> int:
    """`aws s3 ls --recursive` output (`date time size key`) or one bare key per line."""
    count = 0
    for line in text:
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("PRE "):
            continue
        match = _LS_LINE.fullmatch(line)
        key, size = (match[2], int(match[1])) if match else (line, -1)
        if _keep(key, spec):
            sink(key, size, None)
            count += 1
    return count


def _inventory_csv(text: io.TextIOBase, spec: DatasetSpec, sink: Sink) -> int:
    """S3 Inventory CSV: bucket, URL-encoded key, then optional fields (size and ETag found by shape)."""
    count = 0
    for row in csv.reader(text):
        if len(row) < 2:
            continue
        key = unquote_plus(row[1])
        size = next((int(value) for value in row[2:] if value.isdigit()), -1)
        etag = next((value for value in row[2:] if _ETAG.fullmatch(value)), None)
        if _keep(key, spec):
            sink(key, size, etag)
            count += 1
    return count


def _load_data_csv(data: bytes, spec: DatasetSpec, sink: Sink) -> int:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        column_types={}, strings_can_be_null=False, auto_dict_encode=False))
    return _load_data_table(table, spec, sink)


def _load_data_parquet(data: bytes, spec: DatasetSpec, sink: Sink) -> int:
    import pyarrow.parquet as pq

    return _load_data_table(pq.read_table(io.BytesIO(data)), spec, sink)


def _load_data_table(table: Any, spec: DatasetSpec, sink: Sink) -> int:
    """Keys from `PathName_<Orig|Illum><Stain>` + `FileName_<Orig|Illum><Stain>` column pairs."""
    count = 0
    for column in table.column_names:
        if not column.startswith(("FileName_Orig", "FileName_Illum")):
            continue
        path_column = "PathName_" + column[len("FileName_"):]
        if path_column not in table.column_names:
            continue
        seen: set[str] = set()
        for folder, filename in zip(table[path_column].to_pylist(), table[column].to_pylist()):
            if not folder or not filename:
                continue
            key = f"{_load_data_folder(str(folder), spec)}/{filename}"
            if key not in seen and _keep(key, spec):
                seen.add(key)
                sink(key, -1, None)
                count += 1
    return count


def _load_data_folder(folder: str, spec: DatasetSpec) -> str:
    """A load_data PathName (s3://bucket/…, an absolute mount path, or a key) as a key or root-relative path."""
    folder = folder.rstrip("/")
    if folder.startswith("s3://"):
        folder = folder[5:].partition("/")[2]
    return spec.storage.relative_key(folder)


async def read_index_file(source: str, spec: DatasetSpec, s3cfg: dict, sink: Sink) -> int:
    stream = await open_index(source, s3cfg)
    return await asyncio.to_thread(parse_index_stream, stream, spec, sink)
