"""Where a dataset's objects live: an S3 location (bucket + one or more prefixes, any endpoint) or a local
directory with the same layout (what `aws s3 sync` leaves). Each kind finds its own keys (per-plate load_data
where the JUMP workspace has it, else a LIST or a walk) and makes its own object store, so the rest of the
daemon never asks which kind it has. A new kind of storage is one more class here.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from prefetchd.fetch import LocalStore, ObjectStore, S3Store
from prefetchd.listing import Progress, list_root
from prefetchd.load_data import Rebase, local_rebase, prefix_filter, s3_rebase
from prefetchd.s3 import make_s3_client
from prefetchd.workspace import WorkspaceIndexer, index_local

if TYPE_CHECKING:
    from prefetchd.catalog import KeyCollector
    from prefetchd.load_data import TableReader
    from prefetchd.plate_metadata import PlateTable
    from prefetchd.selection import PlateFilter
    from prefetchd.stores import Stores


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefixes: tuple[str, ...] = ("",)   # each without leading or trailing '/'; ("",) is the whole bucket

    fix_hint = "fix prefix="   # what to change in the dataset string when nothing is found there
    context = ""               # keys are bucket keys
    key_origin = "LIST"        # how keys of plates without load_data are found, for reports

    @property
    def prefix(self) -> str:
        """The prefixes as the dataset string writes them (comma separated)."""
        return ",".join(self.prefixes)

    @property
    def url(self) -> str:
        return ", ".join(f"s3://{self.bucket}/{p}" for p in self.prefixes)

    def describe(self) -> str:
        """Where keys are listed, for messages."""
        return ", ".join(f"s3://{self.bucket}/{list_root(p)}" for p in self.prefixes)

    def cache_where(self, endpoint: str | None) -> str:
        """The part of the index cache key that says where: the same prefix on another endpoint is other data."""
        return f"s3:{endpoint or 'aws'}:{self.bucket}/{self.prefix}"

    def key_space(self, endpoint: str | None) -> str:
        """Where keys are rooted: the same key in the same key space is the same object (for every dataset)."""
        return f"s3:{endpoint or 'aws'}/{self.bucket}"

    def holds(self, key: str) -> bool:
        """Whether a key from an index file lies under this location."""
        return any(not p or key.startswith(p + "/") for p in self.prefixes)

    def rebase(self) -> Rebase:
        """A load_data folder (s3:// URL, key, or a mount path holding the project) as a key folder."""
        return s3_rebase(self.prefixes)

    def keeps_folder(self) -> "Callable[[str], bool]":
        return prefix_filter(self.prefixes)

    async def find_keys(self, s3cfg: dict[str, Any], *, reader: TableReader, collector: KeyCollector,
                        wanted: PlateFilter, plate_table: PlateTable | None, progress: Progress | None) -> dict:
        """Every plate's load_data (one GET each), LIST where there is none; returns the discovery figures."""
        concurrency = int(s3cfg.get("list_concurrency", 16))
        async with make_s3_client(s3cfg, max_pool=concurrency) as client:
            indexer = WorkspaceIndexer(client, self.bucket, reader=reader, collector=collector, wanted=wanted,
                                       plate_table=plate_table, concurrency=concurrency, progress=progress)
            try:
                await indexer.index(self.prefixes)
            except BaseExceptionGroup as group:
                raise _first(group) from None
            return asdict(indexer.stats)

    def make_store(self, stores: Stores) -> ObjectStore:
        store = S3Store(stores.s3client, self.bucket, stores.limiter, stores.counters, retries=int(stores.s3["retries"]),
                        verify_md5=stores.verify_md5(),
                        getter=stores.transport.getter(stores.s3client, self.bucket))
        return stores.on_disk(f"{stores.endpoint or 'aws'}/{self.bucket}", store)


@dataclass(frozen=True)
class LocalDirectory:
    root: str

    fix_hint = "fix root="
    key_origin = "walk"

    @property
    def url(self) -> str:
        return self.root

    def describe(self) -> str:
        return self.root

    def cache_where(self, endpoint: str | None) -> str:
        return f"local:{os.path.abspath(self.root)}"

    def key_space(self, endpoint: str | None) -> str:
        return f"local:{os.path.abspath(self.root)}"

    def holds(self, key: str) -> bool:
        return True   # keys are relative to the root already

    @property
    def context(self) -> str:
        """Keys are paths relative to this directory."""
        return os.path.abspath(self.root)

    def rebase(self) -> Rebase:
        """A load_data folder (an absolute path under the root, an s3:// URL or a key) relative to the root."""
        return local_rebase(self.root)

    def keeps_folder(self) -> "Callable[[str], bool]":
        return lambda folder: True

    async def find_keys(self, s3cfg: dict[str, Any], *, reader: TableReader, collector: KeyCollector,
                        wanted: PlateFilter, plate_table: PlateTable | None, progress: Progress | None) -> dict:
        """Every plate's load_data file under the root, a walk for the rest."""
        plates = await asyncio.to_thread(index_local, self.root, reader, collector, wanted, progress)
        return {"load_data_plates": plates}

    def make_store(self, stores: Stores) -> ObjectStore:
        return LocalStore(self.root, stores.limiter, stores.counters)


Storage = S3Location | LocalDirectory


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
