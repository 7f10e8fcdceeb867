"""Filling slots: GET a field's channels, decode and preprocess them into its slot off the event loop, retry,
and quarantine a field whose objects stay bad (its substitute is served instead, batch sizes stay intact)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Callable

from prefetchd.cache import SlotCache
from prefetchd.decode import assemble_field, probe_shape
from prefetchd.errors import CorruptObjectError, ErrorCode, PrefetchdError, class_for
from prefetchd.fetch import ObjectStore
from prefetchd.illum import IllumCache
from prefetchd.index import Field, Index
from prefetchd.pace import Pace
from prefetchd.preprocess import Preprocessing
from prefetchd.quarantine import Quarantine
from prefetchd.receive import receive_field, receives_in_threads
from prefetchd.shm.arena import Arena

log = logging.getLogger(__name__)

FILL_ATTEMPTS = 3  # whole-field attempts (each GET has its own retries) before quarantine


async def fetch_channels(store: ObjectStore, f: Field) -> list[bytes]:
    """The raw bytes of every channel of `f`, GETs in parallel."""
    etags = f.etags or (None,) * len(f.keys)
    gets = [asyncio.ensure_future(store.get(k, s, e or None)) for k, s, e in zip(f.keys, f.sizes, etags)]
    try:
        return list(await asyncio.gather(*gets))
    except BaseException:
        for get in gets:  # one channel failed: its siblings stop retrying and give their GET slots back
            get.cancel()
        raise


def quarantine_field(quarantine: Quarantine, index: Index, f: int, reason: str) -> None:
    quarantine.add(f, reason)
    log.error("quarantined field %s: %s", index.fields[f].id, reason)


async def probe(index: Index, store: ObjectStore, quarantine: Quarantine) -> tuple[int, list[bytes], tuple]:
    """The first readable field, its channels' bytes and the field shape; if none of the first few is
    readable, the dataset is the problem."""
    last: CorruptObjectError | None = None
    for candidate in range(min(len(index.fields), FILL_ATTEMPTS * 3)):
        f = index.fields[candidate]
        try:
            blobs = await fetch_channels(store, f)
            return candidate, blobs, probe_shape(blobs, list(f.keys))
        except CorruptObjectError as exc:
            last = exc
            quarantine_field(quarantine, index, candidate, str(exc))
    code = last.code if last else ErrorCode.STORAGE
    raise class_for(code)(f"could not read any of the dataset's first fields: {last.message if last else 'empty'}"
                          " (run `prefetchd check DATASET`)", code=code)


class Filler:
    """Runs the fills of one job's arena. `filling` maps each field being filled to a future that resolves to
    True (in its slot) or False (quarantined); `on_done` runs after every fill, whatever its outcome."""

    def __init__(self, index: Index, store: ObjectStore, pool: Executor, preprocessing: Preprocessing,
                 arena: Arena, cache: SlotCache, quarantine: Quarantine, pace: Pace, on_done: Callable[[], None]):
        self.index = index
        self.store = store
        self.pool = pool
        self.preprocessing = preprocessing
        self.arena = arena
        self.cache = cache
        self.quarantine = quarantine
        self.pace = pace
        self.on_done = on_done
        self.illum = IllumCache(store, index.illum, pool)
        self.filling: dict[int, asyncio.Future] = {}
        self.fields_fetched = 0
        self._tasks: set[asyncio.Task] = set()

    def start(self, f: int, slot: int, blobs: list[bytes] | None = None) -> asyncio.Future:
        """Fill `slot` with field `f` (`blobs`: its channels, already fetched)."""
        self.cache.begin_fill(f, slot)
        future = asyncio.get_running_loop().create_future()
        self.filling[f] = future
        task = asyncio.create_task(self._fill(f, slot, future, blobs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _fill(self, f: int, slot: int, future: asyncio.Future, blobs: list[bytes] | None) -> None:
        field_ = self.index.fields[f]
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        error = ""
        try:
            for attempt in range(FILL_ATTEMPTS):
                try:
                    if blobs is None and receives_in_threads(self.store):   # GET and decode on threads
                        illums = await self.illum.get(field_.illum_plate if self.preprocessing.illum else None,
                                                      len(field_.keys))
                        await receive_field(self.store, field_, illums, self.preprocessing, self.arena.slot(slot))
                    else:
                        if blobs is None:
                            blobs = await fetch_channels(self.store, field_)
                        illums = await self.illum.get(field_.illum_plate if self.preprocessing.illum else None,
                                                      len(field_.keys))
                        await loop.run_in_executor(self.pool, assemble_field, blobs, illums, self.preprocessing,
                                                   self.arena.slot(slot), list(field_.keys))
                    self.cache.finish_fill(slot)
                    self.pace.fill_took(time.monotonic() - started)
                    self.fields_fetched += 1
                    future.set_result(True)
                    return
                except Exception as exc:  # corrupt object, storage error, or a bug in preprocessing
                    error = str(exc) if isinstance(exc, PrefetchdError) else f"{type(exc).__name__}: {exc}"
                    blobs = None
                    if not isinstance(exc, PrefetchdError):
                        log.exception("field %s attempt %d/%d failed", field_.id, attempt + 1, FILL_ATTEMPTS)
                    else:
                        log.warning("field %s attempt %d/%d failed: %s", field_.id, attempt + 1, FILL_ATTEMPTS, exc)
            # Whatever the cause, a field that keeps failing is quarantined: waiters move on to its
            # substitute instead of the fill being retried forever.
            self.cache.abort_fill(slot)
            quarantine_field(self.quarantine, self.index, f, error)
            future.set_result(False)
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            raise
        finally:
            self.filling.pop(f, None)
            self.on_done()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self.filling.values():
            if not future.done():
                future.cancel()
