"""`lru`: the classic. The must zone (the Little's-law depth) is fetched whatever it evicts, the least recently
used resident outside it; the deep zone only into free slots (LRU cannot tell whether what it would evict is
needed sooner).

Each rank's window is walked from a scan point, the first position not yet known to be in a slot, kept from call
to call: it moves forward with the cursor and as fields are found in slots, and back when a field it passed
is evicted. So a call costs what it fetches, not the window's length.
"""

from __future__ import annotations

import heapq

from prefetchd.planner.base import MustZone, Planner
from prefetchd.policy import Policy
from prefetchd.timeline import RankState


class LruPlanner(Planner):
    policy = Policy.LRU

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._scan: dict[int, int] = {}    # rank -> the first position (epoch × length + position) not known in a slot

    def _restructured(self) -> None:
        self._scan.clear()

    def _moved(self, rank: RankState, before: tuple | None) -> None:
        here = rank.epoch * self.timeline.length + rank.position
        scan = self._scan.get(rank.rank)
        if scan is None or scan < here or before is None or \
                here < before[0] * self.timeline.length + before[1]:
            self._scan[rank.rank] = here

    def _evicted(self, f: int) -> None:
        """Scan points that passed `f` go back to it: it must be fetched again."""
        tl = self.timeline
        length = tl.length
        for r in self.horizon.ranks:
            st = self.ranks[r]
            scan = self._scan.get(r)
            if scan is None:
                continue
            here = st.epoch * length + st.position
            for g in tl.stand_ins(f):
                for e in range(st.epoch, scan // length + 1):
                    for _, p in tl.uses(g, e, r):
                        if here <= e * length + p < scan:
                            scan = e * length + p
            self._scan[r] = scan

    def _plan(self) -> None:
        must_depth, depth = self.depths()
        protected = MustZone(self, ())
        for limit, free_only in ((must_depth, False), (depth, True)):
            if not self._walk(limit, protected, free_only):
                return

    def _walk(self, limit: int, protected, free_only: bool) -> bool:
        """Fetch what is missing up to `limit` fields ahead of every rank, nearest first, ranks interleaved.
        False: stopped (no slot, or enough fills in flight)."""
        tl = self.timeline
        length = tl.length
        if not length:
            return True
        heap = []
        for r in self.horizon.ranks:
            st = self.ranks[r]
            here = st.epoch * length + st.position
            scan = max(self._scan.get(r, here), here)
            self._scan[r] = scan
            if scan - here < limit:
                heap.append((scan - here, r, here))
        heapq.heapify(heap)
        while heap:
            if self.busy:
                return False
            d, r, here = heap[0]
            e, p = divmod(here + d, length)
            f = tl.substitute(int(tl.order(r, e)[p]))
            if self.cache.lookup(f) is None:
                slot = self.take_slot(protected, free_only=free_only)
                if slot is None:
                    return False
                self.filler.start(f, slot)
            self._scan[r] = here + d + 1
            if d + 1 < limit:
                heapq.heapreplace(heap, (d + 1, r, here))
            else:
                heapq.heappop(heap)
        return True

    def victim(self, protected) -> int | None:
        return next(self.cache.evictable(protected), None)
