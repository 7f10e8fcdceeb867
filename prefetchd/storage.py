"""Where a dataset's objects live: an S3 location (bucket + prefix, any endpoint) or a local directory with the
same layout (what `aws s3 sync` leaves). Each kind lists its own keys and makes its own object store, so the
rest of the daemon never asks which kind it has. A new kind of storage is one more class here.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefetchd.fetch import LocalStore, ObjectStore, S3Store
from prefetchd.listing import Progress, Sink, list_s3, walk_local

if TYPE_CHECKING:
    from prefetchd.dataset import DatasetSpec
    from prefetchd.stores import Stores


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""           # no leading or trailing '/'

    fix_hint = "fix prefix="   # what to change in the dataset string when nothing is found there

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def describe(self) -> str:
        """Where keys are listed, for messages."""
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    def cache_where(self, endpoint: str | None) -> str:
        """The part of the index cache key that says where: the same prefix on another endpoint is other data."""
        return f"s3:{endpoint or 'aws'}:{self.bucket}/{self.prefix}"

    def key_space(self, endpoint: str | None) -> str:
        """Where keys are rooted: the same key in the same key space is the same object (for every dataset)."""
        return f"s3:{endpoint or 'aws'}/{self.bucket}"

    def holds(self, key: str) -> bool:
        """Whether a key from an index file lies under this location."""
        return not self.prefix or key.startswith(self.prefix + "/")

    def relative_key(self, folder: str) -> str:
        """A load_data folder (a key or a mount path holding the prefix) as a key."""
        if self.prefix and self.prefix in folder:
            return folder[folder.index(self.prefix):]
        return folder

    async def list_keys(self, spec: DatasetSpec, s3cfg: dict[str, Any], sink: Sink, progress: Progress | None) -> int:
        return await list_s3(spec, s3cfg, sink, progress)

    def make_store(self, stores: Stores) -> ObjectStore:
        store = S3Store(stores.s3client, self.bucket, stores.limiter, stores.counters, retries=int(stores.s3["retries"]),
                        verify_md5=stores.verify_md5(),
                        getter=stores.transport.getter(stores.s3client, self.bucket))
        return stores.on_disk(f"{stores.endpoint or 'aws'}/{self.bucket}", store)


@dataclass(frozen=True)
class LocalDirectory:
    root: str

    fix_hint = "fix root="

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

    def relative_key(self, folder: str) -> str:
        """A load_data folder (an absolute path under the root, or a relative one) relative to the root."""
        root = os.path.abspath(self.root).rstrip("/") + "/"
        return folder[len(root):] if folder.startswith(root) else folder

    async def list_keys(self, spec: DatasetSpec, s3cfg: dict[str, Any], sink: Sink, progress: Progress | None) -> int:
        return await asyncio.to_thread(walk_local, self.root, sink, progress)

    def make_store(self, stores: Stores) -> ObjectStore:
        return LocalStore(self.root, stores.limiter, stores.counters)


Storage = S3Location | LocalDirectory
