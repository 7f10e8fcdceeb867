"""Offline MIN (Belady), run ahead of the ranks over their upcoming reads, kept from call to call.

The `belady` planner asks two things: which fields will be missed next (in read order: the fields to
prefetch) and which residents MIN evicts before their next read ("doomed": evicting one now costs no hit). Both
come out of one simulation of a demand-fetch cache of `capacity` fields, started from the cache as it is
(`basis`: every live rank's cursor) and advanced lazily over the ranks' batches in lockstep order
(`Horizon.batches`). A batch's reads are simultaneous (a rank leases its whole batch at once), and while a
rank reads batch k the ranks after it still hold their batch k - 1 and those before it their batch k, so the
last batch of every rank is out of reach of an eviction:

- a read of a resident is a hit (its next use moves on);
- a read of anything else is a miss, queued in `misses`; a full cache evicts the resident with the farthest next
  use that is not in any rank's latest batch, and that eviction becomes a *victim*: free to take once the evicted
  field's last read before it is done and released by the rank that read it (`enable`), so that taking it
  early loses nothing MIN would have hit.

The planner fetches the queued misses in order and gives each a victim (any enabled one: all are misses for MIN
anyway, so the order of evictions does not change the hits). The run is kept from call to call, so the work is
O(log cache) per read rather than a fresh MIN per prefetch. Where reality departs from it the run is patched,
not restarted: a field MIN keeps but a demand fetch or a guarded eviction took out (`lost`) is queued as a miss
at its next read; a miss whose field is still in a slot (MIN evicted it, then reads it again before the
eviction was carried out) cancels that eviction instead of fetching (`cancel`). The planner starts a new run
only when the reads themselves change (ranks attach or detach, a field is quarantined, a rank jumps back).
"""

from __future__ import annotations

import collections
import heapq
from typing import Iterator

import numpy as np

from prefetchd.cache import SlotCache
from prefetchd.timeline import Horizon


class MinRun:
    def __init__(self, horizon: Horizon, basis: list[int], residents: list[int], capacity: int):
        self.horizon = horizon
        self.basis = basis
        self.capacity = capacity
        fields = np.asarray(residents, dtype=np.int64)
        uses = horizon.next_uses(fields, basis)
        order = np.argsort(-uses, kind="stable")
        self.next_use: dict[int, int] = dict(zip(fields.tolist(), uses.tolist()))
        self._initial = list(zip(uses[order].tolist(), fields[order].tolist()))   # farthest first
        self._initial_at = 0
        self._heap: list[tuple[int, int]] = []      # (-next use, field) of reads since the basis, once no rank
        #                                             holds them; lazy (an entry is stale once its next use moved)
        self._batches: Iterator = horizon.batches(basis)
        self.frontier = min(basis) if basis else 0  # reads before this time are simulated
        self.misses: collections.deque[tuple[int, int, int, int, int]] = collections.deque()
        self._last_read: dict[int, int] = {}         # field -> time of its latest simulated read
        self._waiting: list[list[tuple[int, int, int]]] = [[] for _ in horizon.ranks]  # per rank: (last read, id, field)
        self._extra: list[tuple[int, int, int, int, int]] = []   # misses of lost fields before the frontier (heap)
        self._lost: set[int] = set()                 # taken out by reality, still kept by the run: a read is a miss
        self.ready: collections.deque[tuple[int, int]] = collections.deque()   # (id, field): free to take
        self.held: list[tuple[int, int]] = []       # enabled but leased or protected now: retried on release
        self._pending: dict[int, collections.deque[int]] = {}   # field -> ids of its evictions not carried out
        self._evicted_at: dict[int, int] = {}        # id -> simulated time of the eviction
        self._next_id = 0
        self._held_batches: collections.deque = collections.deque()   # (fields, heap entries): each rank's latest
        self._held = collections.Counter()

    # ---- the simulation ----------------------------------------------------------------------

    def advance(self, until: int) -> None:
        """Simulate every batch that begins before time `until`."""
        h, basis = self.horizon, self.basis
        nu = self.next_use
        while self.frontier < until:
            t0, r, e, p0, fields = next(self._batches)
            entries = []
            missed = []
            for o, f in enumerate(fields):
                t = t0 + o
                later = h.next_use_after(f, t, basis)
                if f not in nu:
                    missed.append((t, r, e, p0 + o, f))
                elif f in self._lost:          # the run kept it, reality did not: fetch it again
                    self._lost.discard(f)
                    self.misses.append((t, r, e, p0 + o, f))
                nu[f] = later
                entries.append((-later, f))
                self._last_read[f] = t
            self._hold(fields, entries)
            for miss in missed:
                if len(nu) > self.capacity:
                    self._evict_farthest(miss[0])
                self.misses.append(miss)
            self.frontier = t0 + len(fields)

    def _hold(self, fields: list[int], entries: list[tuple[int, int]]) -> None:
        """A batch just read is held (out of eviction's reach) until every rank has read a batch after it; then
        its fields' entries join the heap of candidates."""
        self._held_batches.append((fields, entries))
        self._held.update(fields)
        if len(self._held_batches) <= len(self.horizon.ranks):
            return
        old, old_entries = self._held_batches.popleft()
        self._held.subtract(old)
        nu = self.next_use
        for neg, f in old_entries:
            if self._held[f] <= 0 and nu.get(f) == -neg:
                heapq.heappush(self._heap, (neg, f))

    def _evict_farthest(self, t: int) -> None:
        """Evict the resident with the farthest next use that no rank holds (fields read in a held batch are
        not in the heap yet, and their entries in the initial order are stale)."""
        nu = self.next_use
        initial = self._initial
        while self._initial_at < len(initial) and nu.get(initial[self._initial_at][1]) != initial[self._initial_at][0]:
            self._initial_at += 1   # read since the basis (its entry is stale) or evicted already
        while self._heap and nu.get(self._heap[0][1]) != -self._heap[0][0]:
            heapq.heappop(self._heap)
        first = initial[self._initial_at] if self._initial_at < len(initial) else None
        if first is not None and (not self._heap or first[0] >= -self._heap[0][0]):
            self._initial_at += 1
            victim = first[1]
        elif self._heap:
            victim = heapq.heappop(self._heap)[1]
        else:
            return                  # every resident is held: the cache runs over until one is not
        del nu[victim]
        self._victim(victim, t)

    def _victim(self, f: int, t: int) -> None:
        if f in self._lost:    # reality took it out already
            self._lost.discard(f)
            return
        i = self._next_id
        self._next_id += 1
        self._pending.setdefault(f, collections.deque()).append(i)
        self._evicted_at[i] = t
        last = self._last_read.get(f)
        if last is None:      # not read since the basis: free now
            self.ready.append((i, f))
        else:
            heapq.heappush(self._waiting[self.horizon.rank_of(last)], (last, i, f))

    # ---- what the planner takes ----------------------------------------------------------------

    def next_miss(self, until: int) -> tuple[int, int, int, int, int] | None:
        """The earliest miss not yet handled, simulating up to time `until` to find one."""
        step = self.horizon.step_span
        while not self.misses and self.frontier < until:
            self.advance(min(until, self.frontier + step))
        if self._extra and (not self.misses or self._extra[0] < self.misses[0]):
            return self._extra[0]
        return self.misses[0] if self.misses else None

    def pop_miss(self) -> None:
        if self._extra and (not self.misses or self._extra[0] < self.misses[0]):
            heapq.heappop(self._extra)
        else:
            self.misses.popleft()

    def enable(self, released: list[int]) -> None:
        """Victims whose last read before their eviction is before its rank's `released` time (done and
        released) are free."""
        for waiting, until in zip(self._waiting, released):
            while waiting and waiting[0][0] < until:
                _, i, f = heapq.heappop(waiting)
                self.ready.append((i, f))

    def lost(self, f: int, cursors: list[int]) -> None:
        """Reality evicted `f` out of plan (`cursors`: each rank's next read). If the run evicts it before its next
        read anyway, that eviction is done; otherwise its next read becomes a miss."""
        nxt = int(self.horizon.next_uses(np.array([f], dtype=np.int64), cursors)[0])
        ids = self._pending.get(f)
        if ids and self._evicted_at[ids[0]] <= nxt:
            i = ids.popleft()
            del self._evicted_at[i]
            if not ids:
                del self._pending[f]
            return
        if f not in self.next_use and not ids:
            return
        if nxt >= self.frontier:
            self._lost.add(f)
        else:
            e, p = self.horizon.position_of(nxt)
            heapq.heappush(self._extra, (nxt, self.horizon.ranks[self.horizon.rank_of(nxt)], e, p, f))

    def retry_held(self) -> None:
        if self.held:
            self.ready.extendleft(reversed(self.held))
            self.held = []

    def take_victim(self, cache: SlotCache, protected, released: list[int], until: int) -> int | None:
        """Evict an enabled victim that is in a READY, unleased slot and not `protected`; simulate further (up
        to `until`) while none is enabled yet. None: the prefetch waits."""
        step = self.horizon.step_span
        while True:
            self.enable(released)
            while self.ready:
                i, f = self.ready.popleft()
                if i not in self._evicted_at:
                    continue            # cancelled
                slot = cache.evictable_slot_of(f)
                if slot is None and cache.lookup(f) is None:
                    self._carried_out(f, i)    # not in a slot any more: nothing to do
                    continue
                if slot is None or f in protected:
                    self.held.append((i, f))   # leased, filling or about to be read: later
                    continue
                self._carried_out(f, i)
                return cache.evict(slot)
            if self.frontier >= until:
                return None
            self.advance(min(until, self.frontier + step))

    def cancel(self, f: int, t: int) -> None:
        """The miss of `f` at time `t` found it still in a slot: keep it, and drop MIN's eviction of `f` before
        `t` that was not carried out."""
        ids = self._pending.get(f)
        if ids and self._evicted_at[ids[0]] <= t:
            i = ids.popleft()
            del self._evicted_at[i]
            if not ids:
                del self._pending[f]

    def _carried_out(self, f: int, i: int) -> None:
        ids = self._pending.get(f)
        if ids is not None:
            try:
                ids.remove(i)
            except ValueError:
                pass
            if not ids:
                del self._pending[f]
        self._evicted_at.pop(i, None)

