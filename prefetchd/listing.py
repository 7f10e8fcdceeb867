"""Where keys come from when there is no load_data: a concurrent S3 LIST, a local walk, or an index file.

Every key source feeds `sink(key, size, etag)` (a `KeyCollector.add`); load_data and jump_index tables go
to a `TableReader` instead. Sources:
1. an index file (local path, s3://bucket/key or https://…, optionally gzipped): a keys file (`aws s3 ls
   --recursive` lines or one bare key per line), an S3 Inventory CSV, a load_data CSV/parquet or a
   whole-release jump_index.parquet (read a record batch at a time);
2. a LIST partitioned by folder: `Delimiter='/'` LISTs descend to the plate folders, then each plate's
   image folder and `illum/` folder is listed in full, with up to `s3.list_concurrency` requests in flight;
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

import pyarrow as pa

from prefetchd.errors import DatasetError, ErrorCode, StorageError
from prefetchd.layouts import barcode_of
from prefetchd.s3 import make_s3_client

if TYPE_CHECKING:
    from prefetchd.dataset import DatasetSpec

Sink = Callable[[str, int, "str | None"], None]
Progress = Callable[[int, int, int], None]  # (done plates, total plates so far, keys or rows seen)

LEAF_FOLDERS = ("Images/", "illum/")  # listed in full (no delimiter): all their keys are wanted
TABLE_BATCH_ROWS = 65_536
_LS_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +(\d+) (.+)")
_ETAG = re.compile(r'"?[0-9a-fA-F]{32}(-\d+)?"?')


# ---- S3 LIST ---------------------------------------------------------------------------------------

class PrefixWalker:
    """Concurrent LIST of everything under a prefix: delimiter LISTs descend folder by folder (a Yokogawa
    plate folder's files come with its delimiter LIST), `Images/` and `illum/` folders are listed in full."""

    def __init__(self, client: Any, bucket: str, sink: Sink, concurrency: int | asyncio.Semaphore,
                 progress: Progress | None):
        self.client = client
        self.bucket = bucket
        self.sink = sink
        self.progress = progress
        self.requests = concurrency if isinstance(concurrency, asyncio.Semaphore) else \
            asyncio.Semaphore(max(1, concurrency))
        self.leaves_total = 0
        self.leaves_done = 0
        self.keys = 0
        self.list_requests = 0

    async def run(self, prefix: str) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self.group = group
                group.create_task(self._visit(prefix))
        except ExceptionGroup as group_error:
            raise _first_leaf(group_error) from None

    async def _visit(self, prefix: str) -> None:
        """Delimiter LIST of one folder: keys go to the sink, subfolders are visited or listed in full."""
        for sub in await self.list(prefix, delimiter="/"):
            if _folder_name(sub) in LEAF_FOLDERS:
                self.leaves_total += 1
                self.group.create_task(self._list_leaf(sub))
            else:
                self.group.create_task(self._visit(sub))

    async def _list_leaf(self, prefix: str) -> None:
        await self.list(prefix, delimiter=None)
        self.leaves_done += 1
        self._report()

    async def list(self, prefix: str, delimiter: str | None) -> list[str]:
        """All pages of one LIST; keys go to the sink; returns the common prefixes (subfolders)."""
        params = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        folders: list[str] = []
        while True:
            async with self.requests:
                self.list_requests += 1
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


async def list_folders(client: Any, bucket: str, prefix: str, requests: asyncio.Semaphore | None = None) \
        -> tuple[list[str], int]:
    """The subfolder names directly under a prefix (one delimiter LIST, paginated) and the keys there."""
    params = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    names: list[str] = []
    keys = 0
    while True:
        if requests is None:
            page = await client.list_objects_v2(**params)
        else:
            async with requests:
                page = await client.list_objects_v2(**params)
        names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", ())]
        keys += len(page.get("Contents", ()))
        if not page.get("IsTruncated"):
            return names, keys
        params["ContinuationToken"] = page["NextContinuationToken"]


def _folder_name(prefix: str) -> str:
    """`a/b/Images/` → `Images/`."""
    return prefix[prefix.rstrip("/").rfind("/") + 1:]


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def list_root(prefix: str) -> str:
    return f"{prefix}/" if prefix else ""


_IMAGE_IN_BATCH = re.compile(r"^(?P<batch_root>(?:.*/)?)images/(?P<plate>[^/]+)/(?:Images/)?[^/]+$")


class IllumOutsidePrefix:
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


async def list_prefix(client: Any, bucket: str, prefix: str, sink: Sink, requests: asyncio.Semaphore,
                      progress: Progress | None = None) -> PrefixWalker:
    """LIST everything under one prefix (and the illum folders of plates it reaches into)."""
    root = list_root(prefix)
    recorder = IllumOutsidePrefix(sink, root)
    walker = PrefixWalker(client, bucket, recorder, requests, progress)
    await walker.run(root)
    for folder in sorted(recorder.folders):
        await walker.list(folder, delimiter=None)
    return walker


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

async def read_bytes(where: str, s3cfg: dict, *, what: str = "index=") -> bytes:
    """The bytes of a local file, an s3://bucket/key object or an https:// URL."""
    if where.startswith("s3://"):
        bucket, _, key = where[5:].partition("/")
        async with make_s3_client(s3cfg) as client:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()
    if where.startswith(("https://", "http://")):
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(where) as response:
            if response.status != 200:
                raise DatasetError(f"{what} {where} answered HTTP {response.status}: fix the URL")
            return await response.read()
    try:
        return await asyncio.to_thread(Path(where).expanduser().read_bytes)
    except FileNotFoundError:
        raise DatasetError(f"{what} file {where} does not exist: fix {what} in the dataset string"
                           + (" or --keys-file" if what == "index=" else "")) from None


async def open_index(source: str, s3cfg: dict) -> BinaryIO:
    """A seekable binary stream over a local file or a remote object, gunzipped when compressed."""
    if source.startswith(("s3://", "https://", "http://")):
        stream: BinaryIO = io.BytesIO(await read_bytes(source, s3cfg))
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


def parse_index_stream(stream: BinaryIO, spec: DatasetSpec, sink: Sink, table_sink: Callable[[Any, str], None],
                       where: str) -> str:
    """Detect the index format and feed it: keys to sink, table record batches to table_sink; returns the
    format found ("parquet", "load_data csv", "inventory", "keys")."""
    with stream:
        buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)  # type: ignore
        head = buffered.peek(64 * 1024)
        if head[:4] == b"PAR1":
            _parquet_batches(buffered, table_sink, where)
            return "parquet"
        first_line = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        if re.search(r"(FileName|URL)_Orig", first_line):
            _csv_batches(buffered, first_line, table_sink, where)
            return "load_data csv"
        text = io.TextIOWrapper(buffered, encoding="utf-8", newline="")
        if first_line.startswith('"'):
            _inventory_csv(text, spec, sink)
            return "inventory"
        _keys_file(text, spec, sink)
        return "keys"


def _parquet_batches(stream: BinaryIO, table_sink, where: str) -> None:
    import pyarrow.parquet as pq

    from prefetchd.load_data import wanted_columns

    source = stream if stream.seekable() else io.BytesIO(stream.read())
    parquet = pq.ParquetFile(source)
    columns = wanted_columns(parquet.schema_arrow.names)       # not a jump_index's other columns
    for batch in parquet.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=columns):
        table_sink(batch, where)


def _csv_batches(stream: BinaryIO, header: str, table_sink, where: str) -> None:
    """A load_data CSV, streamed; every column read as text (barcodes like 1053601756 stay strings)."""
    import pyarrow.csv as pacsv

    names = next(csv.reader([header]))
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=8 << 20),
                            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                 strings_can_be_null=False))
    for batch in reader:
        table_sink(batch, where)


def read_table_bytes(data: bytes, name: str, table_sink, where: str) -> None:
    """A load_data object fetched whole (parquet, CSV, gzipped CSV), fed by record batches."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:4] == b"PAR1" or name.endswith(".parquet"):
        _parquet_batches(io.BytesIO(data), table_sink, where)
        return
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    _csv_batches(io.BytesIO(data), header, table_sink, where)


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


async def read_index_file(source: str, spec: DatasetSpec, s3cfg: dict, sink: Sink,
                          table_sink: Callable[[Any, str], None]) -> str:
    stream = await open_index(source, s3cfg)
    return await asyncio.to_thread(parse_index_stream, stream, spec, sink, table_sink, source)
