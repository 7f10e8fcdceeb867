"""The JUMP workspace beside the images: per-plate load_data, read instead of listing ~28k keys per plate.

    <project>/<source>/images/<batch>/images/<plate folder>/…                        the images
    <project>/<source>/workspace/load_data_csv/<batch>/<plate>/load_data_with_illum.parquet   (or .csv, …)

For each prefix of a dataset: its sources and batches (one delimiter LIST each, or the plate table), the
plates of each batch with load_data (one delimiter LIST of `load_data_csv/<batch>/`, or the plate table) and
the plate folders of the batch (one delimiter LIST, to find plates that have none); then one GET per plate.
Only plates without load_data, and prefixes outside this layout, are LISTed key by key.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from prefetchd.catalog import KeyCollector
from prefetchd.layouts import barcode_of
from prefetchd.listing import Progress, list_folders, list_prefix, read_table_bytes, walk_local
from prefetchd.load_data import TableReader
from prefetchd.plate_metadata import PlateTable

if TYPE_CHECKING:
    from prefetchd.selection import PlateFilter

LOAD_DATA_NAMES = ("load_data_with_illum.parquet", "load_data_with_illum.csv.gz", "load_data_with_illum.csv",
                   "load_data.parquet", "load_data.csv.gz", "load_data.csv")
_SOURCE = re.compile(r"source_\w+")
_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Scope:
    """Where a prefix sits in the JUMP layout: `<project>[/<source>[/images[/<batch>[/images[/<folder>…]]]]]`."""

    prefix: str
    project: str
    source: str | None = None
    batch: str | None = None
    folder: str | None = None        # the prefix reaches into one plate folder


def scope_of(prefix: str) -> Scope | None:
    parts = prefix.split("/") if prefix else []
    if not parts or not parts[0]:
        return None
    project = parts[0]
    if len(parts) == 1:
        return Scope(prefix, project)
    if not _SOURCE.fullmatch(parts[1]):
        return None
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == "images"):
        return Scope(prefix, project, parts[1])
    if parts[2] != "images":
        return None
    if len(parts) == 4 or (len(parts) == 5 and parts[4] == "images"):
        return Scope(prefix, project, parts[1], parts[3])
    if parts[4] != "images":
        return None
    return Scope(prefix, project, parts[1], parts[3], parts[5])


@dataclass
class DiscoveryStats:
    load_data_plates: int = 0        # plates read from a load_data object
    load_data_gets: int = 0          # GETs tried (404s included)
    folder_lists: int = 0            # delimiter LISTs of sources, batches and plate folders
    listed_prefixes: list[str] = field(default_factory=list)   # LISTed key by key (no load_data)
    list_requests: int = 0           # LIST requests of those
    sources_seen: list[str] = field(default_factory=list)      # before selection, to explain an empty one
    batches_seen: list[str] = field(default_factory=list)      # "<source>/<batch>"


class WorkspaceIndexer:
    """Reads the load_data of every wanted plate under a dataset's prefixes; LISTs only what has none."""

    def __init__(self, client: Any, bucket: str, *, reader: TableReader, collector: KeyCollector,
                 wanted: "PlateFilter", plate_table: PlateTable | None, concurrency: int,
                 progress: Progress | None = None):
        self.client = client
        self.bucket = bucket
        self.reader = reader
        self.collector = collector
        self.wanted = wanted
        self.plate_table = plate_table
        self.requests = asyncio.Semaphore(max(1, concurrency))
        self.progress = progress
        self.stats = DiscoveryStats()
        self._parse = asyncio.Lock()          # one TableReader, fed one plate at a time
        self._first_name: dict[tuple[str, str], str] = {}
        self._plates_total = 0
        self._plates_done = 0

    async def index(self, prefixes: tuple[str, ...]) -> None:
        async with asyncio.TaskGroup() as group:
            for prefix in prefixes:
                group.create_task(self.index_prefix(prefix))

    async def index_prefix(self, prefix: str) -> None:
        scope = scope_of(prefix)
        if scope is None:
            await self._list(prefix)
            return
        sources = [scope.source] if scope.source else await self._sources(scope.project)
        if not sources:
            await self._list(prefix)
            return
        async with asyncio.TaskGroup() as group:
            for source in sources:
                group.create_task(self._index_source(scope, source))

    async def _folders(self, prefix: str) -> list[str]:
        self.stats.folder_lists += 1
        names, _ = await list_folders(self.client, self.bucket, prefix, self.requests)
        return names

    async def _sources(self, project: str) -> list[str]:
        if self.plate_table is not None and len(self.plate_table):
            return sorted({r.source for r in self.plate_table.records})
        return [name for name in await self._folders(f"{project}/") if _SOURCE.fullmatch(name)]

    async def _index_source(self, scope: Scope, source: str) -> None:
        self.stats.sources_seen.append(source)
        if not self.wanted.source(source):
            return
        if scope.batch:
            batches = [scope.batch]
        elif self.plate_table is not None and self.plate_table.batches(source):
            batches = self.plate_table.batches(source)
        else:
            batches = await self._folders(f"{scope.project}/{source}/images/")
        if not batches:                      # not the JUMP layout after all: LIST what the prefix names
            if scope.source:
                await self._list(scope.prefix)
            return
        self.stats.batches_seen += [f"{source}/{b}" for b in batches]
        batches = [b for b in batches if self.wanted.batch(source, b)]
        async with asyncio.TaskGroup() as group:
            for batch in batches:
                group.create_task(self._index_batch(scope, source, batch))

    async def _index_batch(self, scope: Scope, source: str, batch: str) -> None:
        project = scope.project
        load_data_root = f"{project}/{source}/workspace/load_data_csv/{batch}/"
        images_root = f"{project}/{source}/images/{batch}/images/"
        listed_in_table = self.plate_table.plates(source, batch) if self.plate_table is not None else []
        if listed_in_table:
            with_load_data = [r.plate for r in listed_in_table]
        else:
            with_load_data = await self._folders(load_data_root)
        if not with_load_data:               # no workspace for this batch: LIST its images
            await self._list(scope.prefix if scope.batch else f"{project}/{source}/images/{batch}")
            return
        if scope.folder:
            barcodes = [barcode_of(scope.folder)] if barcode_of(scope.folder) in with_load_data else []
        else:
            barcodes = [b for b in with_load_data if self.wanted.plate(source, batch, b)]
        folders = None if (scope.folder or listed_in_table) else await self._folders(images_root)
        self._plates_total += len(barcodes)
        found = {}
        if barcodes:     # the first plate alone finds which load_data name this batch uses; the rest in parallel
            found[barcodes[0]] = await self._read_plate(load_data_root, source, batch, barcodes[0])
        async with asyncio.TaskGroup() as group:
            tasks = {b: group.create_task(self._read_plate(load_data_root, source, batch, b)) for b in barcodes[1:]}
        found.update({b: task.result() for b, task in tasks.items()})
        missing = [b for b, ok in found.items() if not ok]
        if scope.folder and not barcodes:
            await self._list(scope.prefix)
            return
        if scope.folder:
            if missing:
                await self._list(scope.prefix)
            return
        if folders is None and missing:
            folders = await self._folders(images_root)
        have = set(barcodes) - set(missing)
        for folder in folders or ():
            barcode = barcode_of(folder)
            if barcode not in have and self.wanted.plate(source, batch, barcode, folder):
                await self._list(f"{images_root}{folder}")

    async def _read_plate(self, root: str, source: str, batch: str, barcode: str) -> bool:
        """GET the plate's load_data (the name that worked last in this batch first); False when none."""
        preferred = self._first_name.get((source, batch))
        names = ([preferred] if preferred else []) + [n for n in LOAD_DATA_NAMES if n != preferred]
        for name in names:
            key = f"{root}{barcode}/{name}"
            data = await self._get(key)
            if data is None:
                continue
            self._first_name[source, batch] = name
            async with self._parse:
                kept = self.reader.rows_kept
                self.reader.base = f"{root.split('/workspace/', 1)[0]}/images/{batch}"
                try:
                    await asyncio.to_thread(read_table_bytes, data, name, self.reader.add,
                                            f"s3://{self.bucket}/{key}")
                finally:
                    self.reader.base = None
                kept = self.reader.rows_kept - kept
            self._plates_done += 1
            if self.progress is not None:
                self.progress(self._plates_done, self._plates_total, self.reader.rows_read)
            if not kept:      # its folders lie outside the dataset's prefixes: the plate is LISTed instead
                self.reader.reports[f"{source}/{batch}"].note(
                    f"load_data of {barcode} names no image under the dataset's prefixes; listed instead")
                return False
            self.stats.load_data_plates += 1
            return True
        self._plates_done += 1
        return False

    async def _get(self, key: str) -> bytes | None:
        self.stats.load_data_gets += 1
        async with self.requests:
            try:
                response = await self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return None
                raise
            async with response["Body"] as body:
                return await body.read()

    async def _list(self, prefix: str) -> None:
        self.stats.listed_prefixes.append(prefix)
        walker = await list_prefix(self.client, self.bucket, prefix, self.collector.add, self.requests,
                                   self.progress)
        self.stats.list_requests += walker.list_requests


# ---- a local copy ----------------------------------------------------------------------------------

def local_load_data_files(root: str, wanted: "PlateFilter") -> list[tuple[str, str]]:
    """(path, name) of the load_data of every plate beside a local root `…/<source>/images[/<batch>]`."""
    parts = os.path.abspath(root).rstrip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "images" and _SOURCE.fullmatch(parts[-2]):
        source_dir, source, only_batch = "/".join(parts[:-1]), parts[-2], None
    elif len(parts) >= 3 and parts[-2] == "images" and _SOURCE.fullmatch(parts[-3]):
        source_dir, source, only_batch = "/".join(parts[:-2]), parts[-3], parts[-1]
    else:
        return []
    base = os.path.join(source_dir, "workspace", "load_data_csv")
    if not os.path.isdir(base):
        return []
    found = []
    for batch in sorted(os.listdir(base)) if only_batch is None else [only_batch]:
        batch_dir = os.path.join(base, batch)
        if not os.path.isdir(batch_dir):
            continue
        for barcode in sorted(os.listdir(batch_dir)):
            if not wanted.plate(source, batch, barcode):
                continue
            for name in LOAD_DATA_NAMES:
                path = os.path.join(batch_dir, barcode, name)
                if os.path.isfile(path):
                    found.append((path, name))
                    break
    return found


def index_local(root: str, reader: TableReader, collector: KeyCollector, wanted: "PlateFilter",
                progress: Progress | None = None) -> int:
    """Read the load_data beside a local copy (channel mappings, illum), then walk it for everything else."""
    files = local_load_data_files(root, wanted)
    for number, (path, name) in enumerate(files, 1):
        with open(path, "rb") as handle:
            read_table_bytes(handle.read(), name, reader.add, path)
        if progress is not None:
            progress(number, len(files), reader.rows_read)
    walk_local(root, collector.add, progress)
    return len(files)
