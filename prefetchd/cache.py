"""The cache over arena slots: which field is where, leases, and which slot to evict.

The arena's slot table mirrors the states kept here so that tools can inspect a live arena.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

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

        `free_only`: an optional, early prefetch never evicts. Measured: even a belady-admitted early eviction
        (victim used later than the prefetched field) lowers the hit rate when the cache is tight, because it
        spends the slot before demand would have picked the best victim.
        """
        if self.free:
            return self.free.popleft()
        if free_only:
            return None
        victim = self._victim(protected, next_use)
        if victim is None:
            return None
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
