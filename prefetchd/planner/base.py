"""What every planner shares: the fields live ranks need next (`wanted`, in two zones), the prefetch depth
(Little's law), the batches ranks are about to read, and the demand fetch of a batch a rank is waiting for.

A subclass is one eviction policy: `plan()` starts the prefetch fills, `victim()` picks the slot a fetch that
must not wait evicts (never a leased or filling slot: `SlotCache.evictable`).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from prefetchd.cache import SlotCache
from prefetchd.filler import Filler
from prefetchd.pace import Pace
from prefetchd.policy import Policy
from prefetchd.timeline import RankState, Timeline, live


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

    # ---- the policy ------------------------------------------------------------------------

    def plan(self) -> None:
        """Start the prefetch fills this policy wants now (up to `max_fills` in flight)."""
        raise NotImplementedError

    def victim(self, protected: set[int]) -> int | None:
        """The READY, unleased slot a fetch that must not wait evicts (its field not in `protected`)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------

    def take_slot(self, protected: set[int], *, free_only: bool = False) -> int | None:
        """A FREE slot, else (unless `free_only`) the policy's victim, evicted."""
        slot = self.cache.take_free()
        if slot is not None or free_only:
            return slot
        victim = self.victim(protected)
        return None if victim is None else self.cache.evict(victim)

    def fetch_now(self, batch: list[int]) -> None:
        """A rank is waiting for `batch`: start the fill of each field not in a slot yet, evicting the policy's
        victim but never a field of the batch or of a rank's must zone; when every slot is leased, filling or
        protected, stop (the next release or finished fill wakes the waiter, which calls again)."""
        protected = set(self.wanted()[0]) | set(batch)
        for f in batch:
            if self.cache.lookup(f) is not None or f in self.filler.filling:
                continue
            slot = self.take_slot(protected)
            if slot is None:
                break
            self.filler.start(f, slot)

    def wanted(self) -> tuple[list[int], list[int]]:
        """Fields live ranks need next, nearest first, interleaved across ranks, split in two zones:
        `must` (`prefetch_depth()`; never evicted by a demand fetch; `lru` fetches it whatever it evicts) and
        `deep` (as far as the cache has room; `lru` fetches it only into free slots). `belady` walks both
        zones as one window, evicting only what MIN would."""
        ranks = live(self.ranks.values())
        b = self.batch_size
        # Windows plus every rank's leased batch must fit in the cache, or ranks could starve each other.
        room = self.cache_size // max(1, len(ranks)) - b
        must_depth = max(b, min(self.prefetch_depth(), room))
        depth = max(must_depth, room)  # beyond must_depth: only into free slots
        windows = [self.timeline.window(r, depth) for r in ranks]
        must: dict[int, None] = {}
        deep: dict[int, None] = {}
        for d in range(depth):
            zone = must if d < must_depth else deep
            for window in windows:
                if d < len(window):
                    f = self.timeline.substitute(window[d])
                    if f not in must:
                        zone.setdefault(f, None)
        return list(must), [f for f in deep if f not in must]

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

    def next_batches(self, ranks: Iterable[RankState] | None = None) -> set[int]:
        """The fields of the batch each live rank (or each of `ranks`) consumes next or is waiting for: never
        evicted by a prefetch."""
        chosen = live(self.ranks.values()) if ranks is None else ranks
        b = self.batch_size
        return {self.timeline.substitute(f) for r in chosen for f in self.timeline.window(r, b)}

    def horizon(self):
        return self.timeline.horizon(self.ranks.values())

    @property
    def busy(self) -> bool:
        """As many fills in flight as allowed: plan no more now."""
        return len(self.filler.filling) >= self.max_fills
