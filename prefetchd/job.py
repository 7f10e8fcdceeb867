"""One attached training job: its arena (= cache), its ranks' cursors, and the prefetcher that gets every
rank's next batches ready before they are asked for (`lru`: the next `prefetch_factor` batches whatever that
evicts; `belady`: as far ahead as the cache allows without costing a hit, plus the next batch of a rank that
would otherwise stall — see below).

Every rank's sample order is known (the seeded schedule, across epoch boundaries), so for any field the
daemon knows its next uses: `Horizon` lists them as distances in schedule positions from each live rank's
cursor, over the rest of the current epoch and the whole next one, merged over ranks (the next use is the
nearest over ranks). A quarantined field's positions count for its substitute, which is served there.

Prefetching (`_plan`), per policy:

* `belady` (default) — prefetch and eviction are integrated (`_plan_min`): the window is walked nearest use
  first; a missing field takes a FREE slot, or evicts a resident that offline MIN, run from the cache as it
  is over the upcoming schedule, evicts before that resident's next use ("doomed": its next use is a MIN
  miss anyway). That is the "do no harm" rule of Cao, Felten, Karlin, Li (1995) made exact: nothing needed
  before the prefetched field and nothing MIN keeps for a hit is evicted; leased and filling slots never.
  When no doomed field is free to go (typically MIN's victims are in the batch a rank still holds), the
  prefetcher waits, in order, until a release or a finished fill changes that. The fields fetched are then
  MIN's on the same reference string, so the per-epoch hit rate matches the offline Belady bound of a
  demand-fetch cache of `cache_size` fields (bench.compare.simulate), and the window fills as deep as the
  cache allows beyond what MIN keeps: the larger the cache relative to window + leased batches, the
  fewer prefetches wait.
  One exception keeps the daemon's purpose (no stall) first (`_guarded`): a rank that keeps each batch
  longer than a fill takes (its think time, measured between a reply and its next request, exceeds the
  fill time) gets its next batch fetched even if that evicts a field MIN would keep (the resident with the
  furthest next use that is not needed before it); otherwise it would wait one fill on every batch when
  the cache is tight. Such evictions are counted in `guarded_evictions`. A rank that is back at once (the
  daemon is the bottleneck) gains nothing from it and sees exact MIN; `prefetch_factor: 0` turns it off.
* `lru` — the `must` zone (the Little's-law depth) is fetched whatever it evicts (the least recently used
  resident outside the zone), the `deep` zone only into free slots.

A rank asking for a batch that is not ready (`_claim`) always gets it: its missing fields are fetched on
demand, evicting the resident with the furthest next use (`belady`, MIN's own choice at that moment) or the
least recently used (`lru`), never a leased slot or a field in a rank's prefetch window; when every slot is
leased, filling or protected it waits for the next release or finished fill, both of which wake it.

Hits (`SlotCache.lease`): a use is a hit only when its slot already served a use since it was filled, so a
prefetched field's first use is a miss — the count of a demand-fetch cache, comparable with the bounds.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from prefetchd.cache import SlotCache, min_evictions
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
    think_s: float = 0.0                # moving average: from a batch handed out to the next request
    replied_at: float | None = None


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
    guarded_evictions: int = 0   # belady: prefetch evictions MIN would not make, to keep a rank from stalling
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
        self._positions: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {}
        self._horizon: Horizon | None = None
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
        state.replied_at = None  # the gap across a reconnect is not think time
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
        `must` (`prefetch_depth()`; never evicted by a demand fetch; `lru` fetches it whatever it evicts) and
        `deep` (as far as the cache has room; `lru` fetches it only into free slots). `belady` walks both
        zones as one window, evicting only what MIN would (`_plan_min`)."""
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
        """Distance (in positions) until any live rank uses field `f` again; inf if not in the horizon."""
        return self.horizon().next_use(f)

    def horizon(self) -> "Horizon":
        """Next uses from the ranks' current cursors; rebuilt when a cursor moves or a field is quarantined."""
        key = (tuple((r.rank, r.epoch, r.position) for r in self.ranks.values() if not r.detached),
               len(self.quarantined))
        if self._horizon is None or self._horizon.key != key:
            self._horizon = Horizon(self, key)
        return self._horizon

    def _position_map(self, rank: int, epoch: int) -> dict[int, tuple[int, ...]]:
        """Field -> its positions in this rank's order of `epoch`, substitutes standing in for quarantined
        fields (padding without drop_last can put a field twice in one epoch)."""
        key = (rank, epoch)
        positions = self._positions.get(key)
        if positions is None:
            order = self.schedule_of(rank, epoch).tolist()
            positions = {f: (i,) for i, f in enumerate(order)}   # one pass: epochs have 100k+ fields
            if len(positions) < len(order):  # padded: some field twice
                lists: dict[int, list[int]] = {}
                for i, f in enumerate(order):
                    lists.setdefault(f, []).append(i)
                positions = {f: tuple(v) for f, v in lists.items()}
            for q in self.quarantined:
                _move_positions(positions, q, self.substitute(q))
            self._positions[key] = positions
        return positions

    # ---- serving ---------------------------------------------------------------------------

    async def next_batch(self, rank: int, epoch: int, batch: int) -> dict:
        state = self.ranks[rank]
        self._think(state)
        self._release(state)
        if batch >= self.batches_per_epoch:
            state.epoch, state.position = epoch + 1, 0
            state.replied_at = time.monotonic()
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
        state.replied_at = time.monotonic()
        self.pace.consumed(rank, len(mapped))
        self._wake.set()
        ids = self.index.ids  # a list built per access when the index holds Field objects
        return {
            "ok": True,
            "end": False,
            "epoch": epoch,
            "batch": batch,
            "slots": slots,
            "ids": [ids[f] for f in mapped],
            "generations": [int(self.arena.table["generation"][s]) for s in slots],
            "waited_s": waited,
        }

    @staticmethod
    def _think(state: RankState, alpha: float = 0.3) -> None:
        if state.replied_at is None:
            return
        gap = time.monotonic() - state.replied_at
        state.think_s = gap if state.think_s == 0 else state.think_s + alpha * (gap - state.think_s)

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
        return self.horizon().next_use if self.spec.policy == "belady" else None

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
        if self.spec.policy == "belady":
            self._plan_min(must + deep)
            return
        protected = set(must)
        for zone, fields in (("must", must), ("deep", deep)):
            for f in fields:
                if len(self.filling) >= self.max_fills:
                    return
                if self.cache.lookup(f) is not None:
                    continue
                slot = self.cache.take_slot(protected, None, free_only=zone == "deep")
                if slot is None:
                    break
                self._start_fill(f, slot)

    def _plan_min(self, window: list[int]) -> None:
        """Prefetch `window` (nearest use first) evicting only fields MIN would evict before their next use
        (`SlotCache.take_slot_for`); stop at the first field that must wait, so fetches keep their order."""
        horizon = self.horizon()
        protected = self._next_batches()
        guarded = self._guarded()
        for f in window:
            if len(self.filling) >= self.max_fills:
                return
            if self.cache.lookup(f) is not None:
                continue
            slot = self.cache.take_slot_for(self._doomed(horizon), protected)
            if slot is None and f in guarded:
                # Latency first: evict what MIN would miss least, but never a field needed before this one.
                need_at = horizon.next_use(f)
                sooner = {g for g in self.cache.field_of if g >= 0 and horizon.next_use(g) <= need_at}
                slot = self.cache.take_slot(protected | guarded | sooner, horizon.next_use)
                self.stats.guarded_evictions += slot is not None
            if slot is None:
                return
            self._start_fill(f, slot)

    def _doomed(self, horizon: "Horizon") -> Iterator[int]:
        """Residents (ready, leased or filling) that MIN, run from the cache as it is over every live rank's
        upcoming schedule, evicts before their next use (lazy: nothing is computed while a slot is free;
        `min_evictions`, bounded to a few cache turnovers — beyond that the prefetch waits)."""
        residents = [f for f in self.cache.field_of if f >= 0]
        slots = self.arena.layout.slot_count
        yield from min_evictions(residents, slots, horizon.references(), horizon.next_use, horizon.next_use_after,
                                 max_steps=4 * slots + 64)

    def _next_batches(self, ranks: Iterable[RankState] | None = None) -> set[int]:
        """The fields of the batch each live rank (or each of `ranks`) consumes next or is waiting for: never
        evicted by a prefetch."""
        live = ranks if ranks is not None else (r for r in self.ranks.values() if not r.detached)
        b = self.spec.batch_size
        return {self.substitute(f) for r in live for f in self._window(r, b)}

    def _guarded(self) -> set[int]:
        """The next batch of every rank that keeps a batch longer than a fill takes (`think_s > fill_s`): such a
        rank would stall for a fill on every batch if its next batch waited for MIN's victim (usually the batch
        it holds) to be released, so that batch is fetched even at the cost of a hit. A rank that is back at
        once (the daemon is the bottleneck) gains nothing from it, and with `prefetch_factor` 0 it is off."""
        fill_s = self.pace.fill_s
        if self.spec.prefetch_factor < 1 or fill_s <= 0:
            return set()
        return self._next_batches(r for r in self.ranks.values() if not r.detached and r.think_s > fill_s)

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
        gets = [asyncio.ensure_future(self.store.get(k, s, e or None)) for k, s, e in zip(f.keys, f.sizes, etags)]
        try:
            return list(await asyncio.gather(*gets))
        except BaseException:
            for get in gets:  # one channel failed: its siblings stop retrying and give their GET slots back
                get.cancel()
            raise

    def _quarantine(self, f: int, reason: str) -> None:
        self.quarantined[f] = reason
        try:
            stand_in = self.substitute(f)
        except PrefetchdError:
            self._positions.clear()
        else:  # its positions (and those of fields it stood in for) now belong to its substitute
            for positions in self._positions.values():
                _move_positions(positions, f, stand_in)
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
                               "leased": len(r.leased), "think_s": r.think_s} for r in self.ranks.values()},
            "fields_served": served,
            "cache_hits": st.cache_hits,
            "cache_misses": st.cache_misses,
            "hit_rate": st.cache_hits / served if served else 0.0,
            "hit_rate_bound": min(1.0, s.cache_size / self.n_fields) if self.n_fields else 0.0,
            "fields_fetched": st.fields_fetched,
            "evicted_unused": self.cache.evicted_unused if self.cache else 0,
            "guarded_evictions": st.guarded_evictions,
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


def _move_positions(positions: dict[int, tuple[int, ...]], f: int, to: int) -> None:
    moved = positions.pop(f, None)
    if moved:
        positions[to] = tuple(sorted(positions.get(to, ()) + moved))


class Horizon:
    """Every live rank's upcoming uses of each field, as distances in schedule positions from the rank's
    cursor: the rest of its current epoch, then its next epoch (the seeded schedule is known ahead).
    Distances of several ranks are merged (ranks are taken to advance at the same pace), so `next_use` is
    the nearest use by any rank. Computed lazily per field and kept until a cursor moves."""

    def __init__(self, job: Job, key: tuple):
        self.key = key
        self._uses: dict[int, list[int]] = {}
        self._parts = []
        self._orders = []
        substitute = job.substitute if job.quarantined else None
        for state in job.ranks.values():
            if state.detached:
                continue
            order = job.schedule_of(state.rank, state.epoch)
            following = job.schedule_of(state.rank, state.epoch + 1)
            remaining = max(0, len(order) - state.position)
            self._parts.append((job._position_map(state.rank, state.epoch), state.position,
                                job._position_map(state.rank, state.epoch + 1), remaining))
            self._orders.append((order, state.position, following, substitute))

    def uses(self, f: int) -> list[int]:
        out = self._uses.get(f)
        if out is None:
            out = []
            for current, position, following, remaining in self._parts:
                out.extend(p - position for p in current.get(f, ()) if p >= position)
                out.extend(remaining + p for p in following.get(f, ()))
            out.sort()
            self._uses[f] = out
        return out

    def next_use(self, f: int) -> float:
        uses = self.uses(f)
        return uses[0] if uses else math.inf

    def next_use_after(self, f: int, t: float) -> float:
        """The first use strictly later than `t` positions from now (inf if none in the horizon)."""
        uses = self.uses(f)
        i = bisect.bisect_right(uses, t)
        return uses[i] if i < len(uses) else math.inf

    def references(self) -> Iterator[tuple[int, int]]:
        """(distance, field) of every upcoming use within the horizon, nearest first, ranks interleaved."""
        d = 0
        while True:
            live = False
            for order, position, following, substitute in self._orders:
                i = position + d
                if i < len(order):
                    f = int(order[i])
                else:
                    i -= max(len(order), position)
                    if i >= len(following):
                        continue
                    f = int(following[i])
                live = True
                yield d, substitute(f) if substitute else f
            if not live:
                return
            d += 1
