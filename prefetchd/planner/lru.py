"""`lru`: the classic. The must zone (the Little's-law depth) is fetched whatever it evicts, the least recently
used resident outside it; the deep zone only into free slots (LRU cannot tell whether what it would evict is
needed sooner)."""

from __future__ import annotations

from prefetchd.planner.base import Planner
from prefetchd.policy import Policy


class LruPlanner(Planner):
    policy = Policy.LRU

    def plan(self) -> None:
        must, deep = self.wanted()
        protected = set(must)
        for zone, fields in (("must", must), ("deep", deep)):
            for f in fields:
                if self.busy:
                    return
                if self.cache.lookup(f) is not None:
                    continue
                slot = self.take_slot(protected, free_only=zone == "deep")
                if slot is None:
                    break
                self.filler.start(f, slot)

    def victim(self, protected: set[int]) -> int | None:
        return next(self.cache.evictable(protected), None)
