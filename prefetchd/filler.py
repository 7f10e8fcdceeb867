"""Filling slots: GET a field's channels, decode and preprocess them into its slot off the event loop, retry,
and quarantine a field whose objects stay bad (its substitute is served instead, batch sizes stay intact)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from prefetchd.cache import SlotCache
from prefetchd.decode import assemble_field, field_plane_shapes
from prefetchd.errors import CorruptObjectError, ErrorCode, PrefetchdError, class_for
from prefetchd.fetch import ObjectStore
from prefetchd.field_shape import GroupSample, ShapeDecision, ShapeOption, decide_shape, misfit
from prefetchd.illum import IllumStore
from prefetchd.index import Field, Index
from prefetchd.pace import Pace
from prefetchd.preprocess import Preprocessing
from prefetchd.quarantine import Quarantine
from prefetchd.receive import receive_field, receives_in_threads
from prefetchd.shared_fields import Content, SharedFields
from prefetchd.shm.arena import Arena

log = logging.getLogger(__name__)

FILL_ATTEMPTS = 3  # whole-field attempts (each GET has its own retries) before quarantine
FIELD_BUDGET_S = 120.0  # default of job.field_budget_s: the time a field's reads may take, all attempts together


def over_budget(f: Field, budget_s: float) -> str:
    return (f"no complete read of its {len(f.keys)} object(s) within job.field_budget_s={budget_s:g} s (they "
            "stall or crawl); skipped for this job; raise job.field_budget_s if the link is this slow")


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


SAMPLES_PER_SOURCE = 3   # fields whose sizes decide a source's size (their majority)
SPARE_SAMPLES = 6        # further fields of a source tried when sampled ones cannot be read


@dataclass
class Probe:
    """What sampling the dataset found: the job's field shape, and the sampled fields of that shape with their
    channels already fetched (the first fills: nothing sampled is fetched twice)."""

    decision: ShapeDecision
    groups: list[GroupSample]
    fetched: list[tuple[int, list[bytes]]]     # (field, its channels' bytes), by field position


async def probe(index: Index, store: ObjectStore, quarantine: Quarantine, pool: Executor | None = None,
                option: ShapeOption | None = None, budget_s: float = FIELD_BUDGET_S) -> Probe:
    """Sample a few fields of every source (spread over its fields), read their sizes from the TIFF headers
    and decide the job's field shape from the majorities (`field_shape.decide_shape`). Unreadable samples
    are quarantined and the next field of the source tried; if none can be read, the dataset is the problem."""
    names, codes = index.source_groups()
    groups = [GroupSample(name, index.nominal_shape(name)) for name in names]
    readable: list[tuple[int, list[bytes], list[tuple[int, int]]]] = []
    errors: list[CorruptObjectError] = []
    loop = asyncio.get_running_loop()

    async def sample(f: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        try:
            async with asyncio.timeout(budget_s if budget_s > 0 else None) as budget:
                blobs = await fetch_channels(store, index.fields[f])
        except TimeoutError:
            if not budget.expired():
                raise
            raise CorruptObjectError(f"{index.fields[f].id}: {over_budget(index.fields[f], budget_s)}",
                                     code=ErrorCode.TIMEOUT) from None
        keys = list(index.fields[f].keys)
        shapes = await loop.run_in_executor(pool, field_plane_shapes, blobs, keys)
        return blobs, shapes

    async def sample_group(g: int) -> None:
        primary, spare = _candidates(np.flatnonzero(codes == g), SAMPLES_PER_SOURCE, SPARE_SAMPLES)
        pending = list(primary)
        spare = list(spare)
        while pending:
            results = await asyncio.gather(*(sample(f) for f in pending), return_exceptions=True)
            retry = []
            for f, result in zip(pending, results):
                if isinstance(result, CorruptObjectError):
                    errors.append(result)
                    quarantine_field(quarantine, index, f, str(result))
                    if spare:
                        retry.append(spare.pop(0))
                elif isinstance(result, BaseException):
                    raise result
                else:
                    blobs, shapes = result
                    groups[g].add(shapes)
                    readable.append((f, blobs, shapes))
            pending = retry

    try:
        async with asyncio.TaskGroup() as tasks:
            for g in range(len(groups)):
                tasks.create_task(sample_group(g))
    except BaseExceptionGroup as group:   # a storage error of one source is the answer for all
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None
    if not readable:
        last = errors[-1] if errors else None
        code = last.code if last else ErrorCode.STORAGE
        raise class_for(code)(f"could not read any of the dataset's sampled fields: "
                              f"{last.message if last else 'empty'} (run `prefetchd check DATASET`)", code=code)
    decision = decide_shape(groups, option)
    fitting = [(f, blobs) for f, blobs, shapes in sorted(readable, key=lambda r: r[0])
               if not any(misfit(s, decision.size, decision.option) for s in shapes)]
    return Probe(decision, groups, fitting)


def _candidates(positions: np.ndarray, samples: int, spare: int) -> tuple[list[int], list[int]]:
    """`samples` positions spread evenly over a source's fields, then up to `spare` others (from the start)."""
    n = len(positions)
    picks = np.unique(np.linspace(0, n - 1, min(n, samples)).round().astype(np.int64)) if n else []
    chosen = {int(i) for i in picks}
    rest = [int(positions[i]) for i in range(min(n, spare + len(chosen))) if i not in chosen][:spare]
    return [int(positions[i]) for i in picks], rest


class Filler:
    """Runs the fills of one job's arena. `filling` maps each field being filled to a future that resolves to
    True (in its slot) or False (quarantined); `on_done` runs after every fill, whatever its outcome.

    A fill first asks the node-wide registry (`shared`) whether another job holds the same pixels and copies
    them if so; otherwise it GETs the channels while the plate's illumination files load from the daemon-wide
    `illum` store, and registers as the field's holder for the other jobs.

    A field's reads (all attempts, each GET with its own retries) get `budget_s` together: a field whose objects
    keep stalling is quarantined then, not after attempts × retries × read timeout, so a rank waiting for it
    waits at most that long (plus its substitute's fill). Decoding is not timed: it writes into the slot
    from a worker thread, which a timeout could not stop."""

    def __init__(self, index: Index, store: ObjectStore, pool: Executor, preprocessing: Preprocessing,
                 arena: Arena, cache: SlotCache, quarantine: Quarantine, pace: Pace, on_done: Callable[[], None],
                 fit: ShapeOption | None = None, illum: IllumStore | None = None,
                 shared: SharedFields | None = None, key_space: str = "", budget_s: float = FIELD_BUDGET_S):
        self.index = index
        self.fit = fit              # how a field of another size is made the slot's size (None: quarantined)
        self.store = store
        self.pool = pool
        self.preprocessing = preprocessing
        self.arena = arena
        self.cache = cache
        self.quarantine = quarantine
        self.pace = pace
        self.on_done = on_done
        self.budget_s = budget_s
        self.illum = illum if illum is not None else IllumStore(pool)
        self.shared = shared if shared is not None else SharedFields()   # alone: no other job to share with
        self.key_space = key_space
        self.filling: dict[int, asyncio.Future] = {}
        self.fields_fetched = 0
        self.fields_shared = 0       # filled by copying another job's slot instead of GETs
        self.closed = False
        self._held: dict[int, Content] = {}   # fields registered in `shared` as held by this job
        cache.on_vacate = self._vacated
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
        deadline = loop.time() + self.budget_s if self.budget_s > 0 else None   # 0: no budget
        try:
            content = self._content(field_)
            if blobs is None and await self.shared.copy_into(content, self, self.arena.slot(slot), self.pool):
                self.fields_shared += 1
                self._finished(f, slot, content, started, future)
                return
            self._hold(f, content)   # other jobs wanting this field now wait for this fill
            for attempt in range(FILL_ATTEMPTS):
                try:
                    illum = self._illum(field_)   # loads beside the channels' GETs
                    received = False
                    try:
                        async with asyncio.timeout_at(deadline) as budget:
                            if blobs is None and receives_in_threads(self.store):
                                # GETs, decode and preprocessing on worker threads, straight into the slot;
                                # a budget that runs out stops them (receive_field waits for its threads)
                                await receive_field(self.store, field_, await illum, self.preprocessing,
                                                    self.arena.slot(slot), self.fit)
                                received = True
                            else:
                                if blobs is None:
                                    blobs = await fetch_channels(self.store, field_)
                                illums = await illum
                    except TimeoutError:
                        if not budget.expired():
                            raise
                        error = over_budget(field_, self.budget_s)
                        break
                    if not received:
                        await loop.run_in_executor(self.pool, assemble_field, blobs, illums, self.preprocessing,
                                                   self.arena.slot(slot), list(field_.keys), self.fit)
                    self.fields_fetched += 1
                    self._finished(f, slot, content, started, future)
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

    def _finished(self, f: int, slot: int, content: Content, started: float, future: asyncio.Future) -> None:
        self.cache.finish_fill(slot)
        self._hold(f, content)
        self.pace.fill_took(time.monotonic() - started)
        future.set_result(True)

    def _content(self, field_: Field) -> Content:
        illum = self.index.illum.get(field_.illum_plate) if self.preprocessing.illum and field_.illum_plate else None
        return Content(self.key_space, tuple(field_.keys), tuple(field_.etags), illum, self.preprocessing,
                       self.arena.layout.shape, self.fit)

    def _illum(self, field_: Field) -> asyncio.Future:
        """The field's illumination arrays (a future: the plate's missing files start loading now)."""
        plate = field_.illum_plate if self.preprocessing.illum else None
        return self.illum.plate(self.key_space, self.store, plate, self.index.illum.get(plate) if plate else None,
                                len(field_.keys))

    def _hold(self, f: int, content: Content) -> None:
        self._held[f] = content
        self.shared.hold(content, self, f)

    def _vacated(self, f: int) -> None:
        content = self._held.pop(f, None)
        if content is not None:
            self.shared.drop(content, self)

    async def close(self) -> None:
        self.closed = True
        for content in self._held.values():
            self.shared.drop(content, self)
        self._held.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self.filling.values():
            if not future.done():
                future.cancel()
