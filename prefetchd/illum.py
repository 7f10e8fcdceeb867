"""Illumination functions: one store per daemon, shared by every job.

A plate's illumination files (one 2-D float32 array per channel, 4.7 MB each at 1080²) are shared by every field
of the plate, so they are fetched once per plate and kept for every job that reads the plate, within a byte
budget (`illum.budget_bytes`; the default holds a whole cpg0000 selection). Beyond the budget the least
recently used plate is dropped, with a warning in the log and in status: its files are fetched again when a
field of it is next filled. A plate is keyed by its storage's key space (bucket and endpoint, or local root)
and its plate key, so two datasets over the same bucket share it and two endpoints never do.

Each file has at most one load in flight: concurrent fills of a plate's fields await the same future. A filler
starts the plate's loads together with the field's own GETs (`plate`), so no fill waits for them twice.
Reads go through the job's store, so the disk tier keeps illumination files too; their GETs are counted
apart from image GETs (`counters.fetching_illum`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefetchd.counters import fetching_illum
from prefetchd.decode import decode_npy
from prefetchd.fetch import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 5_000_000_000
WARN_EVERY_S = 60.0


@dataclass
class _Plate:
    arrays: dict[str, asyncio.Future] = field(default_factory=dict)   # illum key -> float32 array
    nbytes: int = 0


class IllumStore:
    def __init__(self, pool: Executor, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.pool = pool
        self.budget_bytes = int(budget_bytes)
        self._plates: collections.OrderedDict[tuple[str, str], _Plate] = collections.OrderedDict()
        self.bytes_held = 0
        self.loads = 0                # files read (from the network or the disk tier)
        self.evictions = 0            # plates dropped to stay within the budget
        self._seen: dict[tuple[str, str], int] = {}   # bytes of every plate ever loaded: what the budget should hold
        self._warned_at = -WARN_EVERY_S

    def plate(self, key_space: str, store: ObjectStore, plate: str | None,
              keys: tuple[str | None, ...] | None, n_channels: int) -> asyncio.Future:
        """A future of the plate's arrays, one per channel (None where a channel has no file), with every
        missing file's load started now. `plate` None or `keys` None: no illumination for this field."""
        if plate is None or keys is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result([None] * n_channels)
            return done
        entry = self._plates.get((key_space, plate))
        if entry is None:
            entry = self._plates[(key_space, plate)] = _Plate()
        else:
            self._plates.move_to_end((key_space, plate))
        parts = []
        for key in keys:
            if key is None:
                parts.append(_none())
                continue
            future = entry.arrays.get(key)
            if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
                future = entry.arrays[key] = asyncio.ensure_future(self._load(key_space, plate, store, key))
            parts.append(asyncio.shield(future))  # a cancelled fill must not cancel a load other fills await
        gathered = asyncio.gather(*parts)
        gathered.add_done_callback(_retrieve)   # a fill whose GETs failed first never awaits it: no warning
        return gathered

    async def _load(self, key_space: str, plate: str, store: ObjectStore, key: str) -> np.ndarray:
        with fetching_illum():
            blob = await store.get(key)
        array = await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(decode_npy, blob, name=key))
        self.loads += 1
        entry = self._plates.get((key_space, plate))
        if entry is not None and entry.arrays.get(key) is not None:
            entry.nbytes += array.nbytes
            self.bytes_held += array.nbytes
            self._seen[(key_space, plate)] = max(self._seen.get((key_space, plate), 0), entry.nbytes)
            self._keep_budget(keep=(key_space, plate))
        return array

    def _keep_budget(self, keep: tuple[str, str]) -> None:
        while self.bytes_held > self.budget_bytes and len(self._plates) > 1:
            victim = next(iter(self._plates))
            if victim == keep:
                self._plates.move_to_end(keep)
                continue
            dropped = self._plates.pop(victim)
            self.bytes_held -= dropped.nbytes
            self.evictions += 1
            self._warn()

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(self.warning())

    def warning(self) -> str | None:
        if not self.evictions:
            return None
        return (f"the illumination files of the plates in use ({len(self._seen)} plates, {self.needed_bytes / 1e9:.2f} GB) "
                f"exceed illum.budget_bytes={self.budget_bytes}: least recently used plates were dropped "
                f"{self.evictions} times and are fetched again; raise illum.budget_bytes to at least "
                f"{self.needed_bytes}")

    @property
    def needed_bytes(self) -> int:
        return sum(self._seen.values())

    def status(self) -> dict[str, Any]:
        return {"plates": len(self._plates), "bytes": self.bytes_held, "budget_bytes": self.budget_bytes,
                "loads": self.loads, "evictions": self.evictions, "plates_seen": len(self._seen),
                "warning": self.warning()}


async def _none() -> None:
    return None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
