"""One attached training job: its arena (= cache), its ranks' cursors, and the prefetcher that keeps
every rank's next `prefetch_factor` batches ready before they are asked for."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from prefetchd.cache import SlotCache
from prefetchd.counters import RateMeter
from prefetchd.decode import assemble_field, probe_shape
from prefetchd.errors import CorruptObjectError, PrefetchdError, ShmError
from prefetchd.fetch import ObjectStore
from prefetchd.illum import IllumCache
from prefetchd.index import Index
from prefetchd.preprocess import Preprocessing
from prefetchd.schedule import num_batches, schedule
from prefetchd.shm.arena import Arena, arena_name

log = logging.getLogger(__name__)

FILL_ATTEMPTS = 3  # whole-field attempts (each GET has its own retries) before quarantine


@dataclass(frozen=True)
class JobSpec:
    """Everything that fixes a job's sample order and pixels; all ranks of a job must agree on it."""

    job: str
    dataset: str
    seed: int
    world_size: int
    batch_size: int
    drop_last: bool
    cache_size: int
    prefetch_factor: int
    policy: str
    preprocessing: Preprocessing
    channels: tuple[str, ...]

    def differences(self, other: "JobSpec") -> list[str]:
        return [name for name in self.__dataclass_fields__ if getattr(self, name) != getattr(other, name)]


@dataclass
class RankState:
    rank: int
    epoch: int = 0
    position: int = 0            # next schedule position this rank will consume
    leased: list[int] = field(default_factory=list)
    connected: bool = True
    detached: bool = False


@dataclass
class EpochStats:
    served: int = 0
    hits: int = 0
    misses: int = 0


@dataclass
class JobStats:
    fields_served: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fields_fetched: int = 0
    stall_s: float = 0.0
    epochs: dict[int, EpochStats] = field(default_factory=lambda: collections.defaultdict(EpochStats))


class Pace:
    """Moving averages of how long a fill takes and how fast each rank consumes (for Little's law)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.fill_s = 0.0
        self.rate_per_rank = 0.0
        self._last_next: dict[int, float] = {}
        self._completions = RateMeter(window_s=5.0)
        self._fills: collections.deque[float] = collections.deque(maxlen=64)

    def fill_took(self, seconds: float) -> None:
        # A low quantile, not the mean: a fill's duration includes waiting for a CPU or a connection, which
        # grows with the very depth it would set (a feedback loop); the fastest fills show the latency to hide.
        self._fills.append(seconds)
        self.fill_s = float(np.quantile(self._fills, 0.1))
        self._completions.add(1)

    @property
    def fill_rate(self) -> float:
        """Fills completed per second over the last few seconds."""
        return self._completions.rate()

    def consumed(self, rank: int, fields: int) -> None:
        now = time.monotonic()
        last = self._last_next.get(rank)
        self._last_next[rank] = now
        if last is None or now <= last:
            return
        rate = fields / (now - last)
        self.rate_per_rank = rate if self.rate_per_rank == 0 else self.rate_per_rank + self.alpha * (rate - self.rate_per_rank)


class Job:
    def __init__(self, spec: JobSpec, index: Index, store: ObjectStore, pool: Executor, *,
                 max_fills: int, local_world_size: int, shm_mode: int = 0o600, shm_gid: int | None = None,
                 shm_budget: int = 0):
        self.spec = spec
        self.index = index
        self.store = store
        self.pool = pool
        self.max_fills = max_fills
        self.local_world_size = local_world_size
        self._shm = (shm_mode, shm_gid, shm_budget)
        self.illum = IllumCache(store, index.illum, pool)
        self.arena: Arena | None = None
        self.cache: SlotCache | None = None
        self.ranks: dict[int, RankState] = {}
        self.stats = JobStats()
        self.pace = Pace()
        self.quarantined: dict[int, str] = {}
        self.filling: dict[int, asyncio.Future] = {}
        self.idle_since: float | None = None
        self._schedules: dict[tuple[int, int], np.ndarray] = {}
        self._positions: dict[tuple[int, int], dict[int, int]] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._prefetcher: asyncio.Task | None = None
        self.closed = False

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def n_fields(self) -> int:
        return len(self.index.fields)

    @property
    def batches_per_epoch(self) -> int:
        s = self.spec
        return num_batches(self.n_fields, s.world_size, s.batch_size, s.drop_last)

    async def start(self) -> None:
        """Probe the field shape with the first field, create the arena, start prefetching."""
        s = self.spec
        needed = (s.prefetch_factor + 1) * s.batch_size * self.local_world_size
        if s.cache_size < needed:
            raise ShmError(
                f"cache_size={s.cache_size} fields cannot hold (prefetch_factor + 1) × batch_size × local ranks "
                f"= ({s.prefetch_factor} + 1) × {s.batch_size} × {self.local_world_size} = {needed}: "
                f"raise cache_size to at least {needed} or lower prefetch_factor/batch_size"
            )
        first, blobs = await self._probe()
        shape = probe_shape(blobs, list(self.index.fields[first].keys))
        mode, gid, budget = self._shm
        self.arena = Arena.create(arena_name(s.job), s.cache_size, shape, mode=mode, gid=gid, budget_bytes=budget)
        self.cache = SlotCache(self.arena, s.policy)
        slot = self.cache.take_slot(set())
        self._start_fill(first, slot, blobs)
        self._prefetcher = asyncio.create_task(self._prefetch_loop(), name=f"prefetch-{s.job}")

    async def _probe(self) -> tuple[int, list[bytes]]:
        """The first readable field; if none of the first few is readable, the dataset is the problem."""
        last: CorruptObjectError | None = None
        for candidate in range(min(self.n_fields, FILL_ATTEMPTS * 3)):
            f = self.index.fields[candidate]
            try:
                blobs = await self._fetch_channels(f)
                probe_shape(blobs, list(f.keys))
                return candidate, blobs
            except CorruptObjectError as exc:
                last = exc
                self._quarantine(candidate, str(exc))
        raise PrefetchdError(f"could not read any of the dataset's first fields: {last.message if last else 'empty'}"
                             " (run `prefetchd check DATASET`)", code=last.code if last else "storage")

    async def close(self) -> None:
        self.closed = True
        if self._prefetcher is not None:
            self._prefetcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._prefetcher] if self._prefetcher else []), return_exceptions=True)
        for future in self.filling.values():
            if not future.done():
                future.cancel()
        self._changed.set()
        if self.arena is not None:
            self.arena.destroy()
            self.arena = None

    # ---- ranks -----------------------------------------------------------------------------

    def add_rank(self, rank: int) -> RankState:
        state = self.ranks.get(rank)
        if state is None:
            state = self.ranks[rank] = RankState(rank)
        state.connected, state.detached = True, False
        self.idle_since = None
        self._wake.set()
        return state

    def disconnect_rank(self, rank: int, *, detach: bool = False) -> None:
        state = self.ranks.get(rank)
        if state is None or self.closed:
            return
        self._release(state)
        state.connected = False
        state.detached = detach
        if not any(r.connected for r in self.ranks.values()):
            self.idle_since = time.monotonic()
        self._wake.set()

    @property
    def all_detached(self) -> bool:
        return bool(self.ranks) and all(r.detached for r in self.ranks.values())

    def _release(self, state: RankState) -> None:
        if self.closed or self.cache is None:
            state.leased = []
            return
        for slot in state.leased:
            self.cache.release(slot)
        state.leased = []
        self._changed.set()

    def release(self, rank: int, slots: list[int]) -> None:
        state = self.ranks[rank]
        for slot in slots:
            if slot in state.leased:
                state.leased.remove(slot)
                self.cache.release(slot)
        self._changed.set()
        self._wake.set()

    # ---- the schedule ----------------------------------------------------------------------

    def schedule_of(self, rank: int, epoch: int) -> np.ndarray:
        key = (rank, epoch)
        order = self._schedules.get(key)
        if order is None:
            s = self.spec
            order = schedule(self.n_fields, s.seed, epoch, rank, s.world_size, s.batch_size, s.drop_last)
            self._schedules[key] = order
            for old in [k for k in self._schedules if k[0] == rank and k[1] < epoch - 1]:
                self._schedules.pop(old)
                self._positions.pop(old, None)
        return order

    def substitute(self, f: int) -> int:
        """A quarantined field is replaced by the next healthy one, so batch sizes never change."""
        n = self.n_fields
        for step in range(n):
            g = (f + step) % n
            if g not in self.quarantined:
                return g
        raise PrefetchdError("every field of the dataset is quarantined; run `prefetchd check DATASET`",
                             code="storage")

    def _window(self, state: RankState, depth: int) -> list[int]:
        """The next `depth` fields this rank will ask for, across the epoch boundary."""
        out: list[int] = []
        epoch, pos = state.epoch, state.position
        while len(out) < depth:
            order = self.schedule_of(state.rank, epoch)
            take = order[pos : pos + depth - len(out)]
            out.extend(int(f) for f in take)
            if pos + len(take) >= len(order):
                epoch, pos = epoch + 1, 0
                if len(order) == 0:
                    break
            else:
                break
        return out

    def wanted(self) -> tuple[list[int], list[int]]:
        """Fields live ranks need next, nearest first, interleaved across ranks, split in two zones:
        `must` (`prefetch_depth()`: fetched whatever it evicts) and
        `deep` (as far as the cache has room: fetched only into free slots, so it never lowers the hit rate)."""
        live = [r for r in self.ranks.values() if not r.detached]
        b = self.spec.batch_size
        # Windows plus every rank's leased batch must fit in the cache, or ranks could starve each other.
        room = self.spec.cache_size // max(1, len(live)) - b
        must_depth = max(b, min(self.prefetch_depth(), room))
        depth = max(must_depth, room)  # beyond must_depth: only into free slots
        windows = [self._window(r, depth) for r in live]
        must: dict[int, None] = {}
        deep: dict[int, None] = {}
        for d in range(depth):
            zone = must if d < must_depth else deep
            for window in windows:
                if d < len(window):
                    f = self.substitute(window[d])
                    if f not in must:
                        zone.setdefault(f, None)
        return list(must), [f for f in deep if f not in must]

    def prefetch_depth(self) -> int:
        """Fields per rank that must be ready ahead: the batch being assembled plus the larger of
        prefetch_factor batches and Little's law (fields needed per second × seconds a fill takes, 1.5×
        headroom). The rate is what the rank consumes, capped by what the fills can deliver, so a consumer
        faster than the daemon cannot inflate the depth."""
        b = self.spec.batch_size
        live = max(1, sum(not r.detached for r in self.ranks.values()))
        rate = min(self.pace.rate_per_rank, self.pace.fill_rate / live)
        in_flight = math.ceil(1.5 * rate * self.pace.fill_s)
        return b + max(self.spec.prefetch_factor * b, in_flight)

    def next_use(self, f: int) -> float:
        """Distance (in positions) until any rank uses field `f` again; inf if not in the next two epochs."""
        best = float("inf")
        for state in self.ranks.values():
            if state.detached:
                continue
            for epoch, offset in ((state.epoch, 0), (state.epoch + 1, None)):
                positions = self._position_map(state.rank, epoch)
                pos = positions.get(f)
                if pos is None:
                    continue
                if offset == 0:
                    if pos >= state.position:
                        best = min(best, pos - state.position)
                        break
                else:
                    remaining = len(self.schedule_of(state.rank, state.epoch)) - state.position
                    best = min(best, remaining + pos)
        return best

    def _position_map(self, rank: int, epoch: int) -> dict[int, int]:
        key = (rank, epoch)
        positions = self._positions.get(key)
        if positions is None:
            order = self.schedule_of(rank, epoch)
            positions = {int(f): i for i, f in reversed(list(enumerate(order)))}
            self._positions[key] = positions
        return positions

    # ---- serving ---------------------------------------------------------------------------

    async def next_batch(self, rank: int, epoch: int, batch: int) -> dict:
        state = self.ranks[rank]
        self._release(state)
        if batch >= self.batches_per_epoch:
            state.epoch, state.position = epoch + 1, 0
            self._wake.set()
            return {"ok": True, "end": True, "epoch": epoch, "batches": self.batches_per_epoch}
        b = self.spec.batch_size
        state.epoch, state.position = epoch, batch * b
        self._wake.set()
        wanted_fields = [int(f) for f in self.schedule_of(rank, epoch)[batch * b : (batch + 1) * b]]
        started = time.monotonic()
        mapped = await self._wait_ready(wanted_fields)
        waited = time.monotonic() - started
        self.stats.stall_s += waited
        slots = []
        epoch_stats = self.stats.epochs[epoch]
        for f in mapped:
            slot = self.cache.lookup(f)
            hit = self.cache.lease(slot)
            slots.append(slot)
            self.stats.cache_hits += hit
            self.stats.cache_misses += not hit
            epoch_stats.hits += hit
            epoch_stats.misses += not hit
        epoch_stats.served += len(mapped)
        self.stats.fields_served += len(mapped)
        state.leased = slots
        state.position = (batch + 1) * b
        self.pace.consumed(rank, len(mapped))
        self._wake.set()
        return {
            "ok": True,
            "end": False,
            "epoch": epoch,
            "batch": batch,
            "slots": slots,
            "ids": [self.index.ids[f] for f in mapped],
            "generations": [int(self.arena.table["generation"][s]) for s in slots],
            "waited_s": waited,
        }

    async def _wait_ready(self, fields: list[int]) -> list[int]:
        """Start or join the fills of a batch's fields and return once every one is in a slot."""
        while True:
            if self.closed:
                raise PrefetchdError("the daemon is shutting down; reattach when it is back", code="stopping")
            self._changed.clear()  # cleared before checking, so no completion can slip between
            mapped = [self.substitute(f) for f in fields]
            if self._claim(mapped):
                return mapped
            await self._changed.wait()

    def _claim(self, mapped: list[int]) -> bool:
        """True when all fields are ready; otherwise make sure each missing one is being filled."""
        missing = [f for f in mapped if not self.cache.is_ready(f)]
        if not missing:
            return True
        protected = set(self.wanted()[0]) | set(mapped)
        for f in missing:
            if f in self.filling:
                continue
            slot = self.cache.take_slot(protected, self._next_use_fn())
            if slot is None:
                break  # wait for a release or a finished fill
            self._start_fill(f, slot)
        return False

    def _next_use_fn(self):
        return self.next_use if self.spec.policy == "belady" else None

    # ---- prefetching and filling ----------------------------------------------------------

    async def _prefetch_loop(self) -> None:
        while not self.closed:
            self._wake.clear()
            try:
                self._plan()
            except Exception:  # keep prefetching for the other fields; next() still fills on demand
                log.exception("prefetch planning failed for job %s", self.spec.job)
            await self._wake.wait()

    def _plan(self) -> None:
        must, deep = self.wanted()
        protected = set(must)
        for zone, fields in (("must", must), ("deep", deep)):
            for f in fields:
                if len(self.filling) >= self.max_fills:
                    return
                if self.cache.lookup(f) is not None:
                    continue
                slot = self.cache.take_slot(protected, self._next_use_fn(), free_only=zone == "deep")
                if slot is None:
                    break
                self._start_fill(f, slot)

    def _start_fill(self, f: int, slot: int, blobs: list[bytes] | None = None) -> asyncio.Future:
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
                    if blobs is None:
                        blobs = await self._fetch_channels(field_)
                    illums = await self.illum.get(field_.illum_plate if self.spec.preprocessing.illum else None,
                                                  len(field_.keys))
                    await loop.run_in_executor(self.pool, assemble_field, blobs, illums, self.spec.preprocessing,
                                               self.arena.slot(slot), list(field_.keys))
                    self.cache.finish_fill(slot)
                    self.pace.fill_took(time.monotonic() - started)
                    self.stats.fields_fetched += 1
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
            self._quarantine(f, error)
            future.set_result(False)
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            raise
        finally:
            self.filling.pop(f, None)
            self._changed.set()
            self._wake.set()

    async def _fetch_channels(self, f) -> list[bytes]:
        etags = f.etags or (None,) * len(f.keys)
        return list(await asyncio.gather(*(self.store.get(k, s, e or None) for k, s, e in zip(f.keys, f.sizes, etags))))

    def _quarantine(self, f: int, reason: str) -> None:
        self.quarantined[f] = reason
        log.error("quarantined field %s: %s", self.index.fields[f].id, reason)

    # ---- reporting -------------------------------------------------------------------------

    def status(self) -> dict:
        s, st = self.spec, self.stats
        served = st.fields_served
        return {
            "job": s.job,
            "dataset": s.dataset,
            "fields": self.n_fields,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "cache_size": s.cache_size,
            "policy": s.policy,
            "prefetch_factor": s.prefetch_factor,
            "preprocessing": s.preprocessing.to_dict(),
            "shape": list(self.arena.layout.shape) if self.arena else None,
            "shm_name": self.arena.layout.name if self.arena else None,
            "shm_bytes": self.arena.layout.total_bytes if self.arena else 0,
            "ranks": {r.rank: {"epoch": r.epoch, "position": r.position, "connected": r.connected,
                               "leased": len(r.leased)} for r in self.ranks.values()},
            "fields_served": served,
            "cache_hits": st.cache_hits,
            "cache_misses": st.cache_misses,
            "hit_rate": st.cache_hits / served if served else 0.0,
            "hit_rate_bound": min(1.0, s.cache_size / self.n_fields) if self.n_fields else 0.0,
            "fields_fetched": st.fields_fetched,
            "evicted_unused": self.cache.evicted_unused if self.cache else 0,
            "stall_s": st.stall_s,
            "epochs": {e: {"served": v.served, "hits": v.hits, "misses": v.misses,
                           "hit_rate": v.hits / v.served if v.served else 0.0}
                       for e, v in sorted(st.epochs.items())},
            "quarantined": [{"field": self.index.fields[f].id, "reason": r} for f, r in self.quarantined.items()],
            "slots": self.cache.counts() if self.cache else {},
            "filling": len(self.filling),
            "prefetch_depth": self.prefetch_depth(),
            "fill_s": self.pace.fill_s,
            "consume_fields_per_s": self.pace.rate_per_rank,
        }
