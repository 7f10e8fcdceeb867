"""What every planner shares: the prefetch depth (Little's law), the two zones of each rank's window, the batches
ranks are about to read, and the demand fetch of a batch a rank is waiting for.

A subclass is one eviction policy: `plan()` starts the prefetch fills, `victim()` picks the slot a fetch that
must not wait evicts (never a leased or filling slot: `SlotCache.evictable`).

Cost: planning runs on the event loop, so nothing here is proportional to the cache or the epoch per call.
`_sync` notices what changed since the last call (cursors, leases, live ranks, the quarantine) in O(ranks);
each rank's next batch and must zone are kept per rank and redone only when it moves (O(must depth) per batch).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Iterable, Mapping

from prefetchd.cache import SlotCache
from prefetchd.filler import Filler
from prefetchd.pace import Pace
from prefetchd.policy import Policy
from prefetchd.timeline import Horizon, RankState, Timeline, live


class Planner:
    policy: Policy

    def __init__(self, *, batch_size: int, cache_size: int, prefetch_factor: int, max_fills: int,
                 ranks: Mapping[int, RankState], timeline: Timeline, cache: SlotCache, filler: Filler, pace: Pace):
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.prefetch_factor = prefetch_factor
        self.max_fills = max_fills
        self.ranks = ranks           # the job's cursors, read only
        self.timeline = timeline
        self.cache = cache
        self.filler = filler
        self.pace = pace
        self.guarded_evictions = 0   # belady: prefetch evictions MIN would not make, to keep a rank from stalling
        self.planning_s = 0.0        # CPU seconds spent in plan() and fetch_now(): the serial cost per field
        self._seen: dict[int, tuple] = {}          # rank -> (epoch, position, leased, detached) at the last sync
        self._next: dict[int, list[int]] = {}      # rank -> its next batch (substitutes applied)
        self._next_count: collections.Counter[int] = collections.Counter()
        self._zone: dict[int, list[int]] = {}      # rank -> its must zone (substitutes applied)
        self._zone_count: collections.Counter[int] = collections.Counter()
        self._zone_depth = 0
        self._horizon: Horizon | None = None
        self._quarantined = 0

    # ---- the policy ------------------------------------------------------------------------

    def plan(self) -> None:
        """Start the prefetch fills this policy wants now (up to `max_fills` in flight)."""
        started = time.thread_time()
        try:
            self._sync()
            self._plan()
        finally:
            self.planning_s += time.thread_time() - started

    def _plan(self) -> None:
        raise NotImplementedError

    def victim(self, protected: set[int]) -> int | None:
        """The READY, unleased slot a fetch that must not wait evicts (its field not in `protected`)."""
        raise NotImplementedError

    # ---- events (override to keep policy state) ----------------------------------------------

    def _moved(self, rank: RankState, before: tuple | None) -> None:
        """`rank`'s cursor moved (or it attached) since the last sync; `before`: its (epoch, position) then."""

    def _restructured(self) -> None:
        """The live ranks or the quarantine changed: positions mean other things now."""

    def _released(self) -> None:
        """Some rank released slots since the last sync."""

    def _evicted(self, f: int) -> None:
        """Field `f` left its slot."""

    # ---- shared ----------------------------------------------------------------------------

    def _sync(self) -> None:
        """Notice what changed since the last call: O(ranks) when nothing did."""
        restructure = False
        q = len(self.timeline.quarantine)
        if q != self._quarantined:
            self._quarantined = q
            restructure = True
            self._next.clear()
            self._next_count.clear()
            self._zone.clear()
            self._zone_count.clear()
        live_now = [r.rank for r in live(self.ranks.values())]
        epochs = [self.ranks[r].epoch for r in live_now]
        if self._horizon is None or self._horizon.ranks != sorted(live_now) or self._horizon.stale() or \
                self._horizon.far(epochs):
            self._horizon = Horizon(self.timeline, sorted(live_now), origin=min(epochs, default=0))
            restructure = True
        depth = self.depths()[0]
        rezone = depth > self._zone_depth or depth < 0.75 * self._zone_depth   # the rate moved: redo every zone
        if rezone:
            self._zone_depth = depth
        released = False
        moved = []
        for r in self.ranks.values():
            now = (r.epoch, r.position, len(r.leased), r.detached)
            before = self._seen.get(r.rank)
            if before == now and (r.rank in self._next or r.detached):
                if rezone:
                    self._set_next(r)
                continue
            self._seen[r.rank] = now
            if before is not None and now[2] < before[2]:
                released = True
            cursor_moved = before is None or before[:2] != now[:2] or before[3] != now[3] or r.rank not in self._next
            if cursor_moved or rezone:
                self._set_next(r)
            if cursor_moved:
                moved.append((r, before))
        if restructure:
            self._restructured()
        for r, before in moved:
            self._moved(r, None if before is None else before[:2])
        if released:
            self._released()

    def _set_next(self, r: RankState) -> None:
        """Redo `r`'s next batch and must zone."""
        for lists, count in ((self._next, self._next_count), (self._zone, self._zone_count)):
            for f in lists.pop(r.rank, ()):
                count[f] -= 1
                if not count[f]:
                    del count[f]
        if r.detached:
            return
        depth = max(self.batch_size, self._zone_depth)
        tl = self.timeline
        fields = tl.window(r, depth)
        if len(tl.quarantine):
            fields = [tl.substitute(f) for f in fields]
        self._zone[r.rank] = fields
        self._zone_count.update(fields)
        self._next[r.rank] = fields[: self.batch_size]
        self._next_count.update(fields[: self.batch_size])

    @property
    def horizon(self) -> Horizon:
        if self._horizon is None or self._horizon.far([r.epoch for r in live(self.ranks.values())]):
            self._sync()
        return self._horizon

    def cursor_times(self) -> list[int]:
        """Each live rank's cursor (next read) as a reference time, in horizon rank order."""
        h = self.horizon
        return [h.time(r, self.ranks[r].epoch, self.ranks[r].position) for r in h.ranks]

    def released_times(self) -> list[int]:
        """Per live rank (horizon order): its reads before this time are done and released."""
        h = self.horizon
        return [h.time(r, *self.ranks[r].released) for r in h.ranks]

    def take_slot(self, protected, *, free_only: bool = False) -> int | None:
        """A FREE slot, else (unless `free_only`) the policy's victim, evicted."""
        slot = self.cache.take_free()
        if slot is not None or free_only:
            return slot
        victim = self.victim(protected)
        if victim is None:
            return None
        f = self.cache.field_of[victim]
        slot = self.cache.evict(victim)
        self._evicted(f)
        return slot

    def fetch_now(self, batch: list[int]) -> None:
        """A rank is waiting for `batch`: start the fill of each field not in a slot yet, evicting the policy's
        victim but never a field of the batch or of a rank's must zone; when every slot is leased, filling or
        protected, stop (the next release or finished fill wakes the waiter, which calls again)."""
        started = time.thread_time()
        try:
            self._sync()
            protected = MustZone(self, batch)
            for f in batch:
                if self.cache.lookup(f) is not None or f in self.filler.filling:
                    continue
                slot = self.take_slot(protected)
                if slot is None:
                    break
                self.filler.start(f, slot)
        finally:
            self.planning_s += time.thread_time() - started

    def depths(self) -> tuple[int, int]:
        """(must, deep) fields per rank ahead of its cursor: `must` (`prefetch_depth()`; never evicted by a
        demand fetch; `lru` fetches it whatever it evicts) and the window as far as the cache has room (`lru`
        fills the rest only into free slots; `belady` walks both as one window, evicting only what MIN would)."""
        n_live = max(1, len(self.horizon.ranks))
        b = self.batch_size
        room = self.cache_size // n_live - b   # windows plus every rank's leased batch must fit in the cache
        must_depth = max(b, min(self.prefetch_depth(), room))
        return must_depth, max(must_depth, room)

    def prefetch_depth(self) -> int:
        """Fields per rank that must be ready ahead: the batch being assembled plus the larger of
        prefetch_factor batches and Little's law (fields needed per second × seconds a fill takes, 1.5×
        headroom). The rate is what the rank consumes, capped by what the fills can deliver, so a consumer
        faster than the daemon cannot inflate the depth."""
        b = self.batch_size
        n_live = max(1, len(live(self.ranks.values())))
        rate = min(self.pace.rate_per_rank, self.pace.fill_rate / n_live)
        in_flight = math.ceil(1.5 * rate * self.pace.fill_s)
        return b + max(self.prefetch_factor * b, in_flight)

    def in_must_zone(self, f: int) -> bool:
        """Whether a live rank reads `f` within its must zone (`depths()[0]` fields, as of the last sync)."""
        return f in self._zone_count

    def next_batches(self, ranks: Iterable[RankState] | None = None) -> set[int]:
        """The fields of the batch each live rank (or each of `ranks`) consumes next or is waiting for: never
        evicted by a prefetch."""
        self._sync()
        if ranks is None:
            return set(self._next_count)
        return {f for r in ranks for f in self._next.get(r.rank, ())}

    def is_next(self, f: int) -> bool:
        return f in self._next_count

    @property
    def busy(self) -> bool:
        """As many fills in flight as allowed: plan no more now."""
        return len(self.filler.filling) >= self.max_fills


class MustZone:
    """`protected` for a demand fetch: the batch asked for and every rank's must zone, tested per field."""

    def __init__(self, planner: Planner, batch: Iterable[int]):
        self.planner = planner
        self.batch = set(batch)

    def __contains__(self, f: int) -> bool:
        return f in self.batch or self.planner.in_must_zone(f)
