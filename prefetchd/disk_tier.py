"""An optional second cache tier on local disk, in front of the object store.

Raw objects (the TIFF and .npy bytes exactly as downloaded) are kept in a byte-capped directory, so a
dataset larger than RAM but smaller than local disk stops using the network after its first epoch.
Least recently used files go first when the cap is reached. Entries are keyed by the store's location
(bucket and endpoint, or local root) and the key, so two endpoints never share an entry.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
from pathlib import Path

from prefetchd.fetch import ObjectStore

log = logging.getLogger(__name__)


class DiskTier:
    def __init__(self, inner: ObjectStore, directory: str | os.PathLike, max_bytes: int, namespace: str):
        self.inner = inner
        self.counters = inner.counters
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.namespace = namespace
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[Path, int] = collections.OrderedDict()
        self.used_bytes = 0
        self._load_existing()

    def _load_existing(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.directory.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a crash mid-write left it
                continue
            st = path.stat()
            found.append((st.st_mtime, path, st.st_size))
        for _, path, size in sorted(found):
            self._entries[path] = size
            self.used_bytes += size

    def path_of(self, key: str) -> Path:
        digest = hashlib.sha256(f"{self.namespace}\0{key}".encode()).hexdigest()
        return self.directory / digest[:2] / digest

    async def get(self, key: str, expected_size: int = -1, expected_etag: str | None = None) -> bytes:
        path = self.path_of(key)
        if path in self._entries:
            data = await asyncio.to_thread(_read, path)
            if data is not None and (expected_size < 0 or len(data) == expected_size):
                self.hits += 1
                self._entries.move_to_end(path)
                return data
            self._forget(path)  # vanished or damaged on disk: fetch it again
        self.misses += 1
        data = await self.inner.get(key, expected_size, expected_etag)
        if len(data) <= self.max_bytes and path not in self._entries:
            # Bookkeeping stays on the event loop; only the file system work goes to a thread.
            victims = []
            while self.used_bytes + len(data) > self.max_bytes and self._entries:
                victim, size = self._entries.popitem(last=False)
                self.used_bytes -= size
                victims.append(victim)
            self._entries[path] = len(data)
            self.used_bytes += len(data)
            if not await asyncio.to_thread(self._write, path, data, victims):
                self._forget(path)
        return data

    def _write(self, path: Path, data: bytes, victims: list[Path]) -> bool:
        for victim in victims:
            victim.unlink(missing_ok=True)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(data)}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk must not stop serving from the network
            tmp.unlink(missing_ok=True)
            log.warning("disk cache %s: cannot store an object (%s); serving from the network", self.directory,
                        exc.strerror)
            return False
        return True

    def _forget(self, path: Path) -> None:
        size = self._entries.pop(path, 0)
        self.used_bytes -= size
        path.unlink(missing_ok=True)

    def status(self) -> dict:
        return {"dir": str(self.directory), "used_bytes": self.used_bytes, "max_bytes": self.max_bytes,
                "files": len(self._entries), "hits": self.hits, "misses": self.misses}


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
