"""Where each rank of a job is and what it reads next: rank cursors, every rank's schedule across epochs, and
the horizon of upcoming uses that the planner ranks fields by.

Every rank's sample order is known (the seeded schedule, across epoch boundaries), so for any field the daemon
knows its next uses: `Horizon` lists them as distances in schedule positions from each live rank's cursor, over
the rest of the current epoch and the whole next one, merged over ranks (the next use is the nearest over ranks).
A quarantined field's positions count for its substitute, which is served there.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from prefetchd.errors import PrefetchdError
from prefetchd.quarantine import Quarantine
from prefetchd.schedule import num_batches, schedule


@dataclass
class RankState:
    """One rank's cursor: the next schedule position it will consume, and what it holds."""

    rank: int
    epoch: int = 0
    position: int = 0            # next schedule position this rank will consume
    leased: list[int] = field(default_factory=list)
    connected: bool = True
    detached: bool = False
    think_s: float = 0.0                # moving average: from a batch handed out to the next request
    stall_s: float = 0.0                # summed waits in `next` for batches not ready
    batches: int = 0                    # batches handed out
    replied_at: float | None = None

    def asked(self, alpha: float = 0.3) -> None:
        """A request arrived: the gap since the last reply is this rank's think time."""
        if self.replied_at is None:
            return
        gap = time.monotonic() - self.replied_at
        self.think_s = gap if self.think_s == 0 else self.think_s + alpha * (gap - self.think_s)


def live(ranks: Iterable[RankState]) -> list[RankState]:
    return [r for r in ranks if not r.detached]


class Timeline:
    """The sample order of every rank of one job (`schedule`), cached per (rank, epoch), with each field's
    positions and the substitutes of quarantined fields applied."""

    def __init__(self, n_fields: int, seed: int, world_size: int, batch_size: int, drop_last: bool,
                 quarantine: Quarantine):
        self.n_fields = n_fields
        self.seed, self.world_size, self.batch_size, self.drop_last = seed, world_size, batch_size, drop_last
        self.quarantine = quarantine
        self.batches_per_epoch = num_batches(n_fields, world_size, batch_size, drop_last)
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._positions: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {}
        self._moved = 0            # quarantined fields whose positions have moved to their substitutes
        self._horizon: Horizon | None = None

    def order(self, rank: int, epoch: int) -> np.ndarray:
        order = self._orders.get((rank, epoch))
        if order is None:
            order = self.put(rank, epoch, self.compute(rank, epoch))
        return order

    def has(self, rank: int, epoch: int) -> bool:
        return (rank, epoch) in self._orders

    def compute(self, rank: int, epoch: int) -> np.ndarray:
        """The schedule of (rank, epoch); pure, so it may run off the event loop (`Job.orders_ready`)."""
        return schedule(self.n_fields, self.seed, epoch, rank, self.world_size, self.batch_size, self.drop_last)

    def put(self, rank: int, epoch: int, order: np.ndarray) -> np.ndarray:
        self._orders[(rank, epoch)] = order
        # Only the epochs around the newest are kept: a rank that asks for epochs out of order (resumed from a
        # checkpoint, or hostile) must not make the daemon hold one schedule per epoch it ever named.
        for old in [k for k in self._orders if k[0] == rank and not epoch - 1 <= k[1] <= epoch + 1]:
            self._orders.pop(old)
            self._positions.pop(old, None)
        return order

    def batch(self, rank: int, epoch: int, batch: int) -> list[int]:
        b = self.batch_size
        return [int(f) for f in self.order(rank, epoch)[batch * b : (batch + 1) * b]]

    def substitute(self, f: int) -> int:
        return self.quarantine.substitute(f)

    def window(self, cursor: RankState, depth: int) -> list[int]:
        """The next `depth` fields this rank will ask for, across the epoch boundary."""
        out: list[int] = []
        epoch, pos = cursor.epoch, cursor.position
        while len(out) < depth:
            order = self.order(cursor.rank, epoch)
            take = order[pos : pos + depth - len(out)]
            out.extend(int(f) for f in take)
            if pos + len(take) >= len(order):
                epoch, pos = epoch + 1, 0
                if len(order) == 0:
                    break
            else:
                break
        return out

    def positions(self, rank: int, epoch: int) -> dict[int, tuple[int, ...]]:
        """Field -> its positions in this rank's order of `epoch`, substitutes standing in for quarantined
        fields (padding without drop_last can put a field twice in one epoch)."""
        self._follow_quarantine()
        key = (rank, epoch)
        positions = self._positions.get(key)
        if positions is None:
            order = self.order(rank, epoch).tolist()
            positions = {f: (i,) for i, f in enumerate(order)}   # one pass: epochs have 100k+ fields
            if len(positions) < len(order):  # padded: some field twice
                lists: dict[int, list[int]] = {}
                for i, f in enumerate(order):
                    lists.setdefault(f, []).append(i)
                positions = {f: tuple(v) for f, v in lists.items()}
            for q in self.quarantine:
                _move_positions(positions, q, self.substitute(q))
            self._positions[key] = positions
        return positions

    def _follow_quarantine(self) -> None:
        """Move the positions of fields quarantined since the last call to their substitutes."""
        fresh = list(self.quarantine)[self._moved:]
        self._moved = len(self.quarantine)
        for f in fresh:
            try:
                stand_in = self.substitute(f)
            except PrefetchdError:
                self._positions.clear()
                return
            for positions in self._positions.values():   # and those of fields it stood in for
                _move_positions(positions, f, stand_in)

    def horizon(self, cursors: Iterable[RankState]) -> "Horizon":
        """Next uses from the live ranks' cursors; rebuilt when a cursor moves or a field is quarantined."""
        ranks = live(cursors)
        key = (tuple((r.rank, r.epoch, r.position) for r in ranks), len(self.quarantine))
        if self._horizon is None or self._horizon.key != key:
            self._horizon = Horizon(self, ranks, key)
        return self._horizon


def _move_positions(positions: dict[int, tuple[int, ...]], f: int, to: int) -> None:
    moved = positions.pop(f, None)
    if moved:
        positions[to] = tuple(sorted(positions.get(to, ()) + moved))


class Horizon:
    """Every live rank's upcoming uses of each field, as distances in schedule positions from the rank's
    cursor: the rest of its current epoch, then its next epoch (the seeded schedule is known ahead).
    Distances of several ranks are merged (ranks are taken to advance at the same pace), so `next_use` is
    the nearest use by any rank. Computed lazily per field and kept until a cursor moves."""

    def __init__(self, timeline: Timeline, cursors: list[RankState], key: tuple):
        self.key = key
        self._uses: dict[int, list[int]] = {}
        self._parts = []
        self._orders = []
        substitute = timeline.substitute if len(timeline.quarantine) else None
        for cursor in cursors:
            order = timeline.order(cursor.rank, cursor.epoch)
            following = timeline.order(cursor.rank, cursor.epoch + 1)
            remaining = max(0, len(order) - cursor.position)
            self._parts.append((timeline.positions(cursor.rank, cursor.epoch), cursor.position,
                                timeline.positions(cursor.rank, cursor.epoch + 1), remaining))
            self._orders.append((order, cursor.position, following, substitute))

    def uses(self, f: int) -> list[int]:
        out = self._uses.get(f)
        if out is None:
            out = []
            for current, position, following, remaining in self._parts:
                out.extend(p - position for p in current.get(f, ()) if p >= position)
                out.extend(remaining + p for p in following.get(f, ()))
            out.sort()
            self._uses[f] = out
        return out

    def next_use(self, f: int) -> float:
        uses = self.uses(f)
        return uses[0] if uses else math.inf

    def next_use_after(self, f: int, t: float) -> float:
        """The first use strictly later than `t` positions from now (inf if none in the horizon)."""
        uses = self.uses(f)
        i = bisect.bisect_right(uses, t)
        return uses[i] if i < len(uses) else math.inf

    def references(self) -> Iterator[tuple[int, int]]:
        """(distance, field) of every upcoming use within the horizon, nearest first, ranks interleaved."""
        d = 0
        while True:
            any_live = False
            for order, position, following, substitute in self._orders:
                i = position + d
                if i < len(order):
                    f = int(order[i])
                else:
                    i -= max(len(order), position)
                    if i >= len(following):
                        continue
                    f = int(following[i])
                any_live = True
                yield d, substitute(f) if substitute else f
            if not any_live:
                return
            d += 1
