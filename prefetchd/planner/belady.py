"""`belady` (the default): prefetch and eviction integrated, so a prefetch never costs a hit.

The window (both zones of `wanted`) is walked nearest use first; a missing field takes a FREE slot, or evicts a
resident that offline MIN, run from the cache as it is over the upcoming schedule, evicts before that resident's
next use ("doomed": its next use is a MIN miss anyway). That is the "do no harm" rule of Cao, Felten, Karlin, Li
(1995) made exact: nothing needed before the prefetched field and nothing MIN keeps for a hit is evicted; leased
and filling slots never. When no doomed field is free to go (typically MIN's victims are in the batch a rank
still holds), the prefetcher waits, in order, until a release or a finished fill changes that. The fields
fetched are then MIN's on the same reference string, so the per-epoch hit rate matches the offline Belady bound
of a demand-fetch cache of `cache_size` fields (`prefetchd.bounds.simulate`), and the window fills as deep as the cache
allows beyond what MIN keeps: the larger the cache relative to window + leased batches, the fewer prefetches wait.

One exception keeps the daemon's purpose (no stall) first (`guarded`): a rank that keeps each batch longer than a
fill takes (its think time, measured between a reply and its next request, exceeds the fill time) gets its next
batch fetched even if that evicts a field MIN would keep (the resident with the furthest next use that is not
needed before it); otherwise it would wait one fill on every batch when the cache is tight. Such evictions are
counted in `guarded_evictions`. A rank that is back at once (the daemon is the bottleneck) gains nothing from it
and sees exact MIN; `prefetch_factor: 0` turns it off.

A fetch that must not wait (a rank is asking for the batch) evicts the resident with the furthest next use:
MIN's own choice at that moment.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Iterable, Iterator

from prefetchd.cache import SlotCache
from prefetchd.planner.base import Planner
from prefetchd.policy import Policy
from prefetchd.timeline import Horizon, live


class BeladyPlanner(Planner):
    policy = Policy.BELADY

    def plan(self) -> None:
        """Prefetch the window (nearest use first) evicting only fields MIN would evict before their next use;
        stop at the first field that must wait, so fetches keep their order."""
        must, deep = self.wanted()
        horizon = self.horizon()
        protected = self.next_batches()
        guarded = self.guarded()
        for f in must + deep:
            if self.busy:
                return
            if self.cache.lookup(f) is not None:
                continue
            slot = take_doomed_slot(self.cache, self.doomed(horizon), protected)
            if slot is None and f in guarded:
                # Latency first: evict what MIN would miss least, but never a field needed before this one.
                need_at = horizon.next_use(f)
                sooner = {g for g in self.cache.residents if horizon.next_use(g) <= need_at}
                victim = farthest(self.cache, protected | guarded | sooner, horizon.next_use)
                slot = None if victim is None else self.cache.evict(victim)
                self.guarded_evictions += slot is not None
            if slot is None:
                return
            self.filler.start(f, slot)

    def victim(self, protected: set[int]) -> int | None:
        return farthest(self.cache, protected, self.horizon().next_use)

    def doomed(self, horizon: Horizon) -> Iterator[int]:
        """Residents (ready, leased or filling) that MIN, run from the cache as it is over every live rank's
        upcoming schedule, evicts before their next use (lazy: nothing is computed while a slot is free;
        `min_evictions`, bounded to a few cache turnovers — beyond that the prefetch waits)."""
        slots = self.cache.capacity
        yield from min_evictions(self.cache.residents, slots, horizon.references(), horizon.next_use,
                                 horizon.next_use_after, max_steps=4 * slots + 64)

    def guarded(self) -> set[int]:
        """The next batch of every rank that keeps a batch longer than a fill takes (`think_s > fill_s`): such a
        rank would stall for a fill on every batch if its next batch waited for MIN's victim (usually the batch
        it holds) to be released, so that batch is fetched even at the cost of a hit. A rank that is back at
        once (the daemon is the bottleneck) gains nothing from it, and with `prefetch_factor` 0 it is off."""
        fill_s = self.pace.fill_s
        if self.prefetch_factor < 1 or fill_s <= 0:
            return set()
        return self.next_batches(r for r in live(self.ranks.values()) if r.think_s > fill_s)


def farthest(cache: SlotCache, protected: set[int], next_use: Callable[[int], float]) -> int | None:
    """The evictable slot (READY, unleased, field not protected) whose field's next use is furthest away."""
    best, best_distance = None, -1.0
    for slot in cache.evictable(protected):
        distance = next_use(cache.field_of[slot])
        if distance > best_distance:
            best, best_distance = slot, distance
            if distance == math.inf:
                break
    return best


def take_doomed_slot(cache: SlotCache, doomed: Iterable[int], protected: set[int]) -> int | None:
    """A slot for a prefetch: a FREE slot, else the first field of `doomed` (fields offline MIN evicts before
    their next use, in MIN's eviction order; `min_evictions`) that is READY, unleased and not in `protected`,
    evicted. None: nothing may be evicted now, the prefetch waits. `doomed` is consumed lazily, only as far as
    needed."""
    slot = cache.take_free()
    if slot is not None:
        return slot
    for f in doomed:
        slot = cache.evictable_slot_of(f)
        if slot is not None and f not in protected:
            return cache.evict(slot)
    return None


def min_evictions(residents: Iterable[int], capacity: int, references: Iterable[tuple[float, int]],
                  next_use: Callable[[int], float], next_use_after: Callable[[int, float], float],
                  max_steps: int) -> Iterator[int]:
    """Run offline MIN (Belady) from a cache holding `residents` (capacity `capacity`) over `references`
    ((time, field), in order; times are schedule distances from now) and yield, in eviction order, each
    resident that MIN evicts before its next reference — its next use is a miss for MIN anyway, so evicting
    it now costs nothing. A resident referenced first is kept for that hit and never yielded.

    `next_use(f)`: f's first reference from now; `next_use_after(f, t)`: its first reference later than t
    (inf when none within the schedule's horizon). Lazy, and stops after `max_steps` references.
    """
    nu = {f: next_use(f) for f in residents}
    pending = set(nu)  # residents not yet referenced: their fate is open
    heap = [(-t, f) for f, t in nu.items()]
    heapq.heapify(heap)
    for step, (t, f) in enumerate(references):
        if step >= max_steps or not pending:
            return
        if f in nu:
            pending.discard(f)
        else:
            while len(nu) >= capacity and heap:
                neg, g = heapq.heappop(heap)
                if nu.get(g) != -neg:
                    continue  # stale entry
                del nu[g]
                if g in pending:
                    pending.discard(g)
                    yield g
                break
        later = next_use_after(f, t)
        nu[f] = later
        heapq.heappush(heap, (-later, f))
