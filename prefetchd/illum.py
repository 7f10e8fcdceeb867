"""Illumination functions per plate, loaded once and kept in a small LRU (each plate: C × H × W float32)."""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor

import numpy as np

from prefetchd.decode import decode_npy
from prefetchd.fetch import ObjectStore


class IllumCache:
    def __init__(self, store: ObjectStore, illum_keys: dict[str, tuple[str | None, ...]], pool: Executor,
                 max_plates: int = 8):
        self.store = store
        self.illum_keys = illum_keys
        self.pool = pool
        self.max_plates = max_plates
        self._plates: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()

    async def get(self, plate: str | None, n_channels: int) -> list[np.ndarray | None]:
        if plate is None or plate not in self.illum_keys:
            return [None] * n_channels
        future = self._plates.get(plate)
        if future is None:
            future = asyncio.ensure_future(self._load(plate))
            self._plates[plate] = future
            while len(self._plates) > self.max_plates:
                self._plates.popitem(last=False)
        else:
            self._plates.move_to_end(plate)
        try:
            return await asyncio.shield(future)
        except Exception:
            self._plates.pop(plate, None)  # let a later field try again
            raise

    async def _load(self, plate: str) -> list[np.ndarray | None]:
        keys = self.illum_keys[plate]
        blobs = await asyncio.gather(*(self.store.get(k) if k else _none() for k in keys))
        loop = asyncio.get_running_loop()
        return [
            None if blob is None else await loop.run_in_executor(self.pool, lambda b=blob, k=key: decode_npy(b, name=k))
            for blob, key in zip(blobs, keys)
        ]


async def _none() -> None:
    return None
