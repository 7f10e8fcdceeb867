"""The cache over arena slots: which field is where, leases, hit accounting, and the slots a policy may evict.

The arena's slot table mirrors the states kept here so that tools can inspect a live arena. Which slot to evict
is the eviction policy's choice (`prefetchd/planner/`): this class offers FREE slots first, then the READY,
unleased slots in least-recently-used order (`evictable`); leased and filling slots are never evictable.

Hit accounting (`lease`): a use is a hit only when its slot already served a use since it was filled; the
first use after a fill is a miss whether the fill was a prefetch or a demand fetch — the same count as a
demand-fetch cache (every fetch is a miss), so the per-epoch hit rate compares directly with the offline
Belady/LRU bounds (`prefetchd/bounds.py`).
"""

from __future__ import annotations

import collections
from typing import Callable, Container, Iterator

from prefetchd.shm.arena import Arena, SlotState


class SlotCache:
    def __init__(self, arena: Arena):
        self.arena = arena
        n = arena.layout.slot_count
        self.state = [SlotState.FREE] * n
        self.field_of: list[int] = [-1] * n
        self.leases = [0] * n
        self.pins = [0] * n      # another job is copying this slot (`shared_fields.py`): not evictable meanwhile
        self.uses_since_fill = [0] * n
        self.slot_of: dict[int, int] = {}
        self.free: collections.deque[int] = collections.deque(range(n))
        self.evicted_unused = 0  # filled, then evicted before anyone used it: wasted fetches
        self._recency: collections.OrderedDict[int, None] = collections.OrderedDict()  # READY, unleased, unpinned
        self.on_vacate: Callable[[int], None] | None = None   # called with the field of a slot evicted or aborted

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
        self._vacated(field)
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
            if not self.pins[slot]:
                self._recency[slot] = None  # most recently used

    def pin(self, slot: int) -> None:
        """Keep a READY or leased slot from eviction while another job copies it (not a use: no hit counted)."""
        self.pins[slot] += 1
        self._recency.pop(slot, None)

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if not self.pins[slot] and not self.leases[slot] and self.state[slot] == SlotState.READY:
            self._recency[slot] = None  # just read by another job: most recently used

    @property
    def capacity(self) -> int:
        return self.arena.layout.slot_count

    def take_free(self) -> int | None:
        return self.free.popleft() if self.free else None

    def evictable(self, protected: Container[int] = ()) -> Iterator[int]:
        """READY, unleased slots whose field is not in `protected`, least recently used first."""
        return (s for s in self._recency if self.field_of[s] not in protected)

    def evictable_slot_of(self, field: int) -> int | None:
        """The slot of `field` if it is READY and unleased (free to evict), else None."""
        slot = self.slot_of.get(field)
        return slot if slot is not None and slot in self._recency else None

    def evict(self, victim: int) -> int:
        self._recency.pop(victim, None)
        self.evicted_unused += self.uses_since_fill[victim] == 0
        self._vacated(self.field_of[victim])
        self.slot_of.pop(self.field_of[victim], None)
        self.field_of[victim] = -1
        self._set(victim, SlotState.FREE, -1)
        return victim

    def _vacated(self, field: int) -> None:
        if self.on_vacate is not None and field >= 0:
            self.on_vacate(field)

    @property
    def residents(self) -> list[int]:
        """Fields in a slot (filling, ready or leased)."""
        return [f for f in self.field_of if f >= 0]

    def counts(self) -> dict[str, int]:
        out = {state.name: 0 for state in SlotState}
        for state in self.state:
            out[state.name] += 1
        return out
