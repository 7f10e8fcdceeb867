"""The cache over arena slots: which field is where, leases, and which slot to evict.

The arena's slot table mirrors the states kept here so that tools can inspect a live arena.

Two ways to get a slot:

* `take_slot` — a FREE slot, else the policy's victim among READY, unleased slots: `lru` evicts the least
  recently used one, `belady` the one whose next use is furthest away (MIN's own choice when a field is
  needed now). Demand fetches (a rank is waiting for the field), every `lru` prefetch and a `belady`
  prefetch that must not wait (`Job._guarded`: a rank would stall) use it.
* `take_slot_for` — a `belady` prefetch. It may evict only a resident that offline MIN, run from the
  cache's current contents over the known schedule (`min_evictions`), evicts before that resident's next
  use: a "doomed" field, whose next use is a miss for MIN anyway. This is the "do no harm" condition of
  integrated prefetching and caching (Cao, Felten, Karlin, Li 1995) made exact: a field needed before the
  prefetched one is never doomed (MIN's first miss is the prefetched field itself), and neither is one MIN
  would keep for a hit, so the prefetch costs no hit. FREE slots are always fine; leased, filling and
  protected slots never. When no doomed field can be evicted now the prefetch waits (None); the rank's
  demand fetch still gets the field when it asks. The fetches (= misses) are then those of MIN on the same
  reference string (up to the rule that a batch's fields must be resident together), while a prefetch
  goes ahead as soon as MIN has any victim that is free to go.

Hit accounting (`lease`): a use is a hit only when its slot already served a use since it was filled; the
first use after a fill is a miss whether the fill was a prefetch or a demand fetch — the same count as a
demand-fetch cache (every fetch is a miss), so the per-epoch hit rate compares directly with the offline
Belady/LRU bounds.
"""

from __future__ import annotations

import collections
import heapq
from typing import Callable, Iterable, Iterator

from prefetchd.shm.arena import Arena, SlotState

POLICIES = ("lru", "belady")


class SlotCache:
    def __init__(self, arena: Arena, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.arena = arena
        self.policy = policy
        n = arena.layout.slot_count
        self.state = [SlotState.FREE] * n
        self.field_of: list[int] = [-1] * n
        self.leases = [0] * n
        self.uses_since_fill = [0] * n
        self.slot_of: dict[int, int] = {}
        self.free: collections.deque[int] = collections.deque(range(n))
        self.evicted_unused = 0  # filled, then evicted before anyone used it: wasted fetches
        self._recency: collections.OrderedDict[int, None] = collections.OrderedDict()  # READY, unleased

    def _set(self, slot: int, state: SlotState, field: int | None = None) -> None:
        self.state[slot] = state
        self.arena.set_state(slot, state, field)

    def lookup(self, field: int) -> int | None:
        return self.slot_of.get(field)

    def is_ready(self, field: int) -> bool:
        slot = self.slot_of.get(field)
        return slot is not None and self.state[slot] in (SlotState.READY, SlotState.LEASED)

    def begin_fill(self, field: int, slot: int) -> None:
        self.slot_of[field] = slot
        self.field_of[slot] = field
        self.uses_since_fill[slot] = 0
        self._set(slot, SlotState.FILLING, field)

    def finish_fill(self, slot: int) -> None:
        self._set(slot, SlotState.READY)
        self._recency[slot] = None

    def abort_fill(self, slot: int) -> None:
        field = self.field_of[slot]
        self.slot_of.pop(field, None)
        self.field_of[slot] = -1
        self._set(slot, SlotState.FREE, -1)
        self.free.append(slot)

    def lease(self, slot: int) -> bool:
        """Hand a READY slot to a client. Returns True when this use is a cache hit."""
        self.leases[slot] += 1
        self._recency.pop(slot, None)
        self._set(slot, SlotState.LEASED)
        hit = self.uses_since_fill[slot] > 0
        self.uses_since_fill[slot] += 1
        return hit

    def release(self, slot: int) -> None:
        if self.leases[slot] <= 0:
            return
        self.leases[slot] -= 1
        if self.leases[slot] == 0:
            self._set(slot, SlotState.READY)
            self._recency[slot] = None  # most recently used

    def take_slot(self, protected: set[int], next_use: Callable[[int], float] | None = None,
                  free_only: bool = False) -> int | None:
        """A FREE slot, else the victim the policy picks among READY slots not in `protected`.

        `free_only`: an optional, early `lru` prefetch never evicts (it would push out a field that LRU
        cannot tell is needed sooner). `belady` prefetches use `take_slot_for` instead.
        """
        if self.free:
            return self.free.popleft()
        if free_only:
            return None
        victim = self._victim(protected, next_use)
        if victim is None:
            return None
        return self._evict(victim)

    def take_slot_for(self, doomed: Iterable[int], protected: set[int]) -> int | None:
        """A slot for a `belady` prefetch: a FREE slot, else the first field of `doomed` (fields offline MIN
        evicts before their next use, in MIN's eviction order; `min_evictions`) that is READY, unleased and
        not in `protected`. None: nothing may be evicted now, the prefetch waits. `doomed` is consumed lazily,
        only as far as needed."""
        if self.free:
            return self.free.popleft()
        for f in doomed:
            slot = self.slot_of.get(f)
            if slot is not None and slot in self._recency and f not in protected:
                return self._evict(slot)
        return None

    def _evict(self, victim: int) -> int:
        self._recency.pop(victim, None)
        self.evicted_unused += self.uses_since_fill[victim] == 0
        self.slot_of.pop(self.field_of[victim], None)
        self.field_of[victim] = -1
        self._set(victim, SlotState.FREE, -1)
        return victim

    def _victim(self, protected: set[int], next_use: Callable[[int], float] | None) -> int | None:
        candidates: Iterable[int] = (s for s in self._recency if self.field_of[s] not in protected)
        if self.policy == "lru" or next_use is None:
            return next(iter(candidates), None)
        best, best_distance = None, -1.0
        for slot in candidates:
            distance = next_use(self.field_of[slot])
            if distance > best_distance:
                best, best_distance = slot, distance
                if distance == float("inf"):
                    break
        return best

    def counts(self) -> dict[str, int]:
        out = {state.name: 0 for state in SlotState}
        for state in self.state:
            out[state.name] += 1
        return out


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
