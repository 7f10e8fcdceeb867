"""The on-disk index cache: one Arrow IPC file per (dataset location, endpoint, index source).

Uncompressed and memory-mapped: a warm start maps the file instead of decompressing it (the whole release,
8M fields, is ~60 bytes a field on disk), and the pages are the kernel's to keep or drop. Written atomically
(temporary file + rename; a running daemon keeps reading the old inode). A file that cannot be read, or was
written by another format version, is reported with one warning and rebuilt.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyarrow as pa

from prefetchd.catalog import Catalog
from prefetchd.errors import ErrorCode, PrefetchdError

FORMAT_VERSION = 2
log = logging.getLogger("prefetchd.index")


class CacheWriteError(PrefetchdError):
    code = ErrorCode.CACHE_WRITE


def cache_file(cache_dir: Path, cache_key: str) -> Path:
    return Path(cache_dir) / f"index-{cache_key}.arrow"


def load_catalog(path: Path) -> Catalog | None:
    """The cached catalog, or None when there is none or it cannot be used (then it gets rebuilt)."""
    if not path.exists():
        return None
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        catalog, meta = Catalog.from_table(table)
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('version')}, expected {FORMAT_VERSION}")
        return catalog
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        log.warning("index cache %s is unusable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None


def save_catalog(path: Path, catalog: Catalog, *, location: str, endpoint: str | None) -> None:
    """Write atomically; raises CacheWriteError with one line when the disk is full or not writable."""
    table = catalog.with_metadata({"version": FORMAT_VERSION, "location": location, "endpoint": endpoint})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CacheWriteError(cache_write_message(path, exc)) from None


def cache_write_message(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write the index cache {path}: no space left on device; free space there or set "
                "cache_dir (or XDG_CACHE_HOME) to a disk with room")
    reason = exc.strerror or str(exc)
    return f"cannot write the index cache {path}: {reason}; fix the permissions or set cache_dir"
