"""`belady` (the default): prefetch and eviction integrated, so a prefetch never costs a hit.

Offline MIN runs ahead of the ranks over their known reads (`min_run.py`, from the cache as it is). Its misses
are the fields to prefetch, in read order; each takes a FREE slot or a *victim*: a resident MIN evicts before
its next read, once that read's predecessor is done and released (its next use is a MIN miss anyway, so
evicting it now costs nothing). That is the "do no harm" rule of Cao, Felten, Karlin, Li (1995) made exact:
nothing needed before the prefetched field and nothing MIN keeps for a hit is evicted; leased and filling slots
never. When no victim is free (typically MIN's victims are in the batch a rank still holds), the prefetcher
waits, in order, until a release or a finished fill changes that. The fields fetched are then MIN's on the same
reads, so the per-epoch hit rate matches the offline Belady bound of a demand-fetch cache of `cache_size`
fields (`prefetchd.bounds.simulate`), and the window fills as deep as the cache allows beyond what MIN keeps.

One exception keeps the daemon's purpose (no stall) first (`guarded`): a rank that keeps each batch longer than a
fill takes (its think time, measured between a reply and its next request, exceeds the fill time) gets its next
batch fetched even if that evicts a field MIN would keep (the resident with the furthest next use that is not
needed before it); otherwise it would wait one fill on every batch when the cache is tight. Such evictions are
counted in `guarded_evictions`. A rank that is back at once (the daemon is the bottleneck) gains nothing from it
and sees exact MIN; `prefetch_factor: 0` turns it off.

A fetch that must not wait (a rank is asking for the batch) takes a victim too, else evicts the resident with
the furthest next use: MIN's own choice at that moment.

Cost: the run is kept from call to call (O(log cache) per read) and patched where reality departs from it (a
demand or guarded eviction of a field MIN keeps: `MinRun.lost`); ranks attaching or detaching, a quarantine or a
rank jumping back start a new run (O(cache), vectorised). `runs` counts the runs started.
"""

from __future__ import annotations

import numpy as np

from prefetchd.planner.base import Planner
from prefetchd.planner.min_run import MinRun
from prefetchd.policy import Policy
from prefetchd.timeline import RankState, live

LOOKAHEAD_TURNOVERS = 4   # simulate at most this many cache-fulls of reads ahead to find a victim


class BeladyPlanner(Planner):
    policy = Policy.BELADY

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.run: MinRun | None = None
        self.runs = 0                 # MIN runs started: 1 + restarts
        self._departed = False        # reality took a field the run keeps (patched; restart when it pays)

    # ---- the run -------------------------------------------------------------------------------

    def _restructured(self) -> None:
        self.run = None

    def _moved(self, rank: RankState, before: tuple | None) -> None:
        length = self.timeline.length
        if before is not None and rank.epoch * length + rank.position < before[0] * length + before[1]:
            self.run = None    # a rank went back (a resumed checkpoint): its reads come again
        elif self.run is not None:
            self.run.retry_held()

    def _released(self) -> None:
        if self.run is not None:
            self.run.retry_held()

    def _evicted(self, f: int) -> None:
        if self.run is not None:
            self.run.lost(f, self.cursor_times())
            self._departed = True

    def current_run(self) -> MinRun:
        if self.run is not None and self._departed and \
                min(self.cursor_times()) - min(self.run.basis) >= self.cache.capacity:
            self.run = None    # patched until now; a new run from reality is optimal again, and costs about a
            #                    cache-full of simulated reads: at most once per cache-full of reads consumed
        if self.run is None:
            self._departed = False
            self.run = MinRun(self.horizon, self.cursor_times(), list(self.cache.slot_of), self.cache.capacity)
            self.runs += 1
        return self.run

    def lookahead(self) -> int:
        """Simulate up to this time: a few cache-fulls of reads past the earliest cursor."""
        return min(self.cursor_times()) + LOOKAHEAD_TURNOVERS * self.cache.capacity + 64

    # ---- prefetch ------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Prefetch MIN's misses in read order, each into a free slot or an enabled victim; stop at the first
        that must wait (or lies beyond its rank's window), so fetches keep their order."""
        if not self.horizon.ranks:
            return
        released = self.released_times()
        run = self.current_run()
        until = self.lookahead()
        depth = self.depths()[1]
        length = self.timeline.length
        protected = _NextBatches(self)
        guarded: set[int] | None = None
        while not self.busy:
            miss = run.next_miss(until)
            if miss is None:
                return
            t, r, e, p, f = miss
            st = self.ranks[r]
            ahead = (e - st.epoch) * length + p - st.position
            if ahead < 0:              # read already (fetched on demand)
                run.pop_miss()
                continue
            if ahead >= depth:
                return
            if self.cache.lookup(f) is not None:
                run.cancel(f, t)
                run.pop_miss()
                continue
            slot = self.cache.take_free()
            if slot is None:
                slot = run.take_victim(self.cache, protected, released, until)
            if slot is None:
                guarded = self.guarded() if guarded is None else guarded
                if f in guarded:
                    slot = self._guarded_slot(f, guarded)
                if slot is None:
                    return
            run.pop_miss()
            self.filler.start(f, slot)

    def take_slot(self, protected, *, free_only: bool = False) -> int | None:
        """For a fetch that must not wait: a FREE slot, else a victim of the run, else the farthest resident."""
        slot = self.cache.take_free()
        if slot is not None or free_only:
            return slot
        if self.horizon.ranks:
            slot = self.current_run().take_victim(self.cache, protected, self.released_times(), self.lookahead())
            if slot is not None:
                return slot
        return super().take_slot(protected)

    def victim(self, protected) -> int | None:
        return self.farthest(lambda f: f in protected)

    def farthest(self, excluded, after: int = -1) -> int | None:
        """The evictable slot whose field's next use (from the cursors) is furthest away and later than `after`,
        skipping fields for which `excluded(f)` holds. O(cache), vectorised: only when reality departs from MIN."""
        slots = list(self.cache.evictable())
        if not slots:
            return None
        fields = np.fromiter((self.cache.field_of[s] for s in slots), dtype=np.int64, count=len(slots))
        uses = self.horizon.next_uses(fields, self.cursor_times()) if self.horizon.ranks else \
            np.zeros(len(slots), dtype=np.int64)
        for i in np.argsort(-uses, kind="stable").tolist():
            if uses[i] <= after:
                return None
            if not excluded(int(fields[i])):
                return slots[i]
        return None

    def guarded(self) -> set[int]:
        """The next batch of every rank that keeps a batch longer than a fill takes (`think_s > fill_s`): such a
        rank would stall for a fill on every batch if its next batch waited for MIN's victim (usually the batch
        it holds) to be released, so that batch is fetched even at the cost of a hit. A rank that is back at
        once (the daemon is the bottleneck) gains nothing from it, and with `prefetch_factor` 0 it is off."""
        fill_s = self.pace.fill_s
        if self.prefetch_factor < 1 or fill_s <= 0:
            return set()
        return self.next_batches(r for r in live(self.ranks.values()) if r.think_s > fill_s)

    def _guarded_slot(self, f: int, guarded: set[int]) -> int | None:
        """Latency first: evict what MIN would miss least, but never a field needed before `f`."""
        need_at = int(self.horizon.next_uses(np.array([f], dtype=np.int64), self.cursor_times())[0])
        victim = self.farthest(lambda g: self.is_next(g) or g in guarded, after=need_at)
        if victim is None:
            return None
        self.guarded_evictions += 1
        f_out = self.cache.field_of[victim]
        slot = self.cache.evict(victim)
        self._evicted(f_out)
        return slot


class _NextBatches:
    """Fields some rank reads in its next batch: never evicted by a prefetch."""

    def __init__(self, planner: Planner):
        self.planner = planner

    def __contains__(self, f: int) -> bool:
        return self.planner.is_next(f)
