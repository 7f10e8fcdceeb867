"""Jobs share what is cached: the node-wide registry of which job's arena holds which field's pixels.

Every job keeps its own arena, schedule, epoch and exactly-once guarantee (DESIGN.md, "Several jobs on one
node"); what jobs share is the work of filling a slot. Before a job's filler GETs a field it asks here whether
another job holds the same `Content` — the same objects (key space, keys, ETags, illumination files), the same
preprocessing and field shape, so that only bit-identical pixels are ever shared:

- READY (or leased) in another job's slot: that slot is pinned against eviction for the duration of the copy
  and copied into the asking job's slot on the decode pool (never on the event loop);
- being fetched by another job: that fill is awaited, then copied;
- neither: the asking job fetches it and registers as its holder (`hold`), until its slot is vacated (`drop`).

A copy is a fill for the asking job: its first use there is a miss, as after a GET, so hit rates keep
comparing with the offline bounds; copies are counted apart (`fields_shared`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from prefetchd.cache import SlotCache
from prefetchd.field_shape import ShapeOption
from prefetchd.preprocess import Preprocessing
from prefetchd.shm.arena import Arena

ROUNDS = 3   # a holder may vacate between its fill ending and the copy starting: look again, then fetch


@dataclass(frozen=True)
class Content:
    """What a filled slot's pixels are a function of."""

    key_space: str                                  # where keys are rooted (bucket + endpoint, or local root)
    keys: tuple[str, ...]                           # the channels' objects, in channel order
    etags: tuple[str | None, ...]
    illum: tuple[str | None, ...] | None            # the illumination files applied (None: none)
    preprocessing: Preprocessing
    shape: tuple[int, int, int]
    fit: ShapeOption | None = None                  # the `shape` option that cropped/padded it


class Holder(Protocol):
    """A job's side of the registry (its `Filler`)."""

    cache: SlotCache
    arena: Arena
    filling: dict[int, asyncio.Future]
    closed: bool


class SharedFields:
    def __init__(self) -> None:
        self._holders: dict[Content, dict[Holder, int]] = {}   # content -> {holder: its field index}
        self.copies = 0
        self.bytes_copied = 0
        self.waits = 0          # copies that first waited for another job's fill

    def hold(self, content: Content, holder: Holder, field: int) -> None:
        """`holder` fetches (or has filled) `field` with this content."""
        self._holders.setdefault(content, {})[holder] = field

    def drop(self, content: Content, holder: Holder) -> None:
        holders = self._holders.get(content)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._holders[content]

    def __len__(self) -> int:
        return len(self._holders)

    async def copy_into(self, content: Content, asking: Holder, dest: np.ndarray, pool: Executor) -> bool:
        """Fill `dest` (the asking job's slot) from another job's slot with this content; False when no other
        job holds it (the caller fetches it)."""
        waited = False
        for _ in range(ROUNDS):
            found = self._source(content, asking)
            if found is None:
                return False
            holder, slot, pending = found
            if pending is not None:   # another job is fetching it: wait for that fill, then look again
                waited = True
                await asyncio.wait([pending])
                continue
            src = holder.arena.slot(slot)   # views made here: a closing arena keeps its mapping while they live
            holder.cache.pin(slot)
            try:
                await asyncio.get_running_loop().run_in_executor(pool, np.copyto, dest, src)
            finally:
                holder.cache.unpin(slot)
            self.copies += 1
            self.bytes_copied += dest.nbytes
            self.waits += waited
            return True
        return False

    def _source(self, content: Content, asking: Holder) -> tuple[Holder, int, asyncio.Future | None] | None:
        """A holder with the content in a READY or leased slot (preferred), else one still fetching it."""
        fetching = None
        for holder, field in list(self._holders.get(content, {}).items()):
            if holder is asking:
                continue
            if holder.closed or holder.arena is None:
                self.drop(content, holder)
                continue
            slot = holder.cache.lookup(field)
            if slot is not None and holder.cache.is_ready(field):
                return holder, slot, None
            future = holder.filling.get(field)
            if future is not None and not future.done():
                fetching = fetching or (holder, -1, future)
            elif slot is None:
                self.drop(content, holder)
        return fetching

    def status(self) -> dict[str, Any]:
        return {"fields_shared": self.copies, "bytes_shared": self.bytes_copied, "shared_after_wait": self.waits,
                "contents_held": len(self._holders)}
