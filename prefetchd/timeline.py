"""Where each rank of a job is and what it reads next: rank cursors, every rank's schedule across epochs, and
the horizon of upcoming uses that the planner ranks fields by.

Every rank's sample order is known (the seeded schedule, across epoch boundaries), so for any field the daemon
knows its next uses. One epoch's orders are one permutation dealt round-robin to the ranks (`schedule.py`), so
its inverse says in O(1) which rank reads a field at which position (`EpochOrder`); nothing here walks an
epoch or the cache per batch. `Horizon` turns positions into reference times: the live ranks read in lockstep,
batch k of every rank (rank by rank) before batch k + 1, as data-parallel training does, and a field's next use
is its first reference after a given time within the reference's epoch and the next one. A quarantined field's
positions count for its substitute, which is served there.
"""

from __future__ import annotations

import array
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from prefetchd.errors import PrefetchdError
from prefetchd.quarantine import Quarantine
from prefetchd.schedule import num_batches, permutation, samples_per_rank, schedule

NEVER = 1 << 62   # a reference time after every real one: no use within the horizon
FAR_EPOCHS = 1 << 16   # epochs past a horizon's origin before the planner builds another (times stay < NEVER)
ORDERS_AHEAD = 4   # schedules kept per rank past the newest one put (the horizon reads a few epochs ahead)


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

    @property
    def released(self) -> tuple[int, int]:
        """(epoch, position) before which this rank holds nothing: the start of the batch it has leased."""
        return self.epoch, max(0, self.position - len(self.leased))


def live(ranks: Iterable[RankState]) -> list[RankState]:
    return [r for r in ranks if not r.detached]


class EpochOrder:
    """One epoch's permutation and its inverse: rank r reads `perm[(p * world + r) % n]` at position p (the
    padded tail repeats the head, like DistributedSampler), and a field's permutation index gives its rank and
    position back."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.perm = permutation(n, seed, epoch)
        self.inv = np.empty(n, dtype=np.int64)
        self.inv[self.perm] = np.arange(n, dtype=np.int64)


KEEP_EPOCHS = 6   # permutations kept (`Timeline.epoch`): the epochs served and the planner's horizon ahead


class Timeline:
    """The sample order of every rank of one job (`schedule`), with each field's positions and the
    substitutes of quarantined fields applied."""

    def __init__(self, n_fields: int, seed: int, world_size: int, batch_size: int, drop_last: bool,
                 quarantine: Quarantine):
        self.n_fields = n_fields
        self.seed, self.world_size, self.batch_size, self.drop_last = seed, world_size, batch_size, drop_last
        self.quarantine = quarantine
        self.batches_per_epoch = num_batches(n_fields, world_size, batch_size, drop_last)
        self.per_rank = samples_per_rank(n_fields, world_size, drop_last)   # before drop_last's batch trim
        self.length = len(schedule(n_fields, seed, 0, 0, world_size, batch_size, drop_last)) if n_fields else 0
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._epochs: dict[int, EpochOrder] = {}
        self._stand_ins: dict[int, tuple[int, ...]] = {}   # substitute -> the fields it is served for
        self._moved = 0

    # ---- orders ------------------------------------------------------------------------------

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
        # Epochs behind the one put go; so do the farthest ahead beyond a few per rank: a rank that asks for
        # epochs out of order (resumed from a checkpoint, or hostile) must not make the daemon hold one schedule
        # per epoch it ever named, while a look-ahead over the next epochs stays cached (the planner's horizon
        # reads its look-ahead from `epoch(e)`, the permutations, so it never evicts the served schedule).
        held = sorted(k[1] for k in self._orders if k[0] == rank)
        ahead = [e for e in held if e > epoch]
        for e in [e for e in held if e < epoch - 1] + ahead[ORDERS_AHEAD:]:
            self._orders.pop((rank, e))
        return order

    def batch(self, rank: int, epoch: int, batch: int) -> list[int]:
        b = self.batch_size
        return self.order(rank, epoch)[batch * b : (batch + 1) * b].tolist()

    def epoch(self, e: int) -> EpochOrder:
        order = self._epochs.get(e)
        if order is None:
            order = self._epochs[e] = EpochOrder(self.n_fields, self.seed, e)
            if len(self._epochs) > KEEP_EPOCHS:   # the nearest the newest: the horizon's few epochs, bounded
                for old in sorted(self._epochs, key=lambda k: abs(k - e))[KEEP_EPOCHS:]:
                    del self._epochs[old]
        return order

    def uses(self, f: int, e: int, rank: int | None = None) -> list[tuple[int, int]]:
        """(rank, position) of every read of field `f` itself in epoch `e` (two when padding repeats it); with
        `rank`, that rank's only, solved from the inverse in O(its reads): never O(world_size / fields)."""
        n, w = self.n_fields, self.world_size
        i = int(self.epoch(e).inv[f])
        if rank is not None:   # positions p < length with (p * w + rank) % n == i: a linear congruence
            g = math.gcd(w, n)
            if (i - rank) % g:
                return []
            m = n // g
            first = (i - rank) // g * pow(w // g, -1, m) % m
            return [(rank, p) for p in range(first, self.length, m)]
        out = []
        while i < self.per_rank * w:
            p = i // w
            if p < self.length:
                out.append((i % w, p))
            i += n
        return out

    def window(self, cursor: RankState, depth: int) -> list[int]:
        """The next `depth` fields this rank will ask for, across the epoch boundary (substitutes not applied)."""
        out: list[int] = []
        epoch, pos = cursor.epoch, cursor.position
        while len(out) < depth and self.length:
            take = self.order(cursor.rank, epoch)[pos : pos + depth - len(out)]
            out.extend(take.tolist())
            epoch, pos = epoch + 1, 0
        return out

    # ---- quarantine --------------------------------------------------------------------------

    def substitute(self, f: int) -> int:
        return self.quarantine.substitute(f) if f in self.quarantine else f

    def stand_ins(self, f: int) -> tuple[int, ...]:
        """The fields whose positions count for `f`: `f` itself, and the quarantined fields it is served for."""
        self._follow_quarantine()
        return self._stand_ins.get(f, (f,))

    def _follow_quarantine(self) -> None:
        if self._moved == len(self.quarantine):
            return
        self._moved = len(self.quarantine)
        groups: dict[int, list[int]] = {}
        for q in self.quarantine:
            try:
                s = self.quarantine.substitute(q)
            except PrefetchdError:   # everything quarantined: nothing is served, nothing to rank
                self._stand_ins = {}
                return
            groups.setdefault(s, [s]).append(q)
        self._stand_ins = {s: tuple(g) for s, g in groups.items()}


class Horizon:
    """Reference times of the live ranks' reads, and each field's next use after a given time.

    Time counts single reads in lockstep order: batch step k of epoch e (e × batches_per_epoch + k), then the
    live ranks in rank order, then the position in the batch. A field's uses are looked up in the epoch of
    the time asked about and the next one (`NEVER` beyond), from a per-epoch table of each field's reference
    time (numpy for many fields at once, an `array` for one) built once per epoch and set of live ranks.
    Reads before a rank's `basis` position (consumed when the caller's view of the ranks was taken) are not
    uses. Built again when the live ranks or the quarantine change.
    """

    def __init__(self, timeline: Timeline, ranks: Sequence[int], origin: int = 0):
        self.timeline = timeline
        self.ranks = list(ranks)
        self.origin = origin        # the epoch at time 0: times stay small whatever epoch a rank names (2**63 - 1)
        self.index = {r: i for i, r in enumerate(self.ranks)}
        self.b = timeline.batch_size
        self.bpe = timeline.batches_per_epoch
        self.step_span = len(self.ranks) * self.b
        self.epoch_span = self.bpe * self.step_span
        self.quarantined = len(timeline.quarantine)
        self._tables: dict[int, tuple[np.ndarray, array.array, dict[int, int]]] = {}

    def time(self, rank: int, epoch: int, position: int) -> int:
        k, o = divmod(position, self.b)
        return ((epoch - self.origin) * self.bpe + k) * self.step_span + self.index[rank] * self.b + o

    def far(self, epochs: Sequence[int]) -> bool:
        """Whether a rank's epoch lies outside this horizon's range of small times (build another from it)."""
        return any(not 0 <= e - self.origin < FAR_EPOCHS for e in epochs)

    def rank_of(self, t: int) -> int:
        """Index (in `ranks`) of the rank that reads at time `t`."""
        return (t % self.step_span) // self.b

    def position_of(self, t: int) -> tuple[int, int]:
        """(epoch, position) of the read at time `t` (its rank: `rank_of`)."""
        e, rest = divmod(t, self.epoch_span)
        k, rest = divmod(rest, self.step_span)
        return e + self.origin, k * self.b + rest % self.b

    def stale(self) -> bool:
        return len(self.timeline.quarantine) != self.quarantined

    def table(self, e: int) -> tuple[np.ndarray, array.array, dict[int, int]]:
        """(times as numpy, the same as an array, padding's second reads) of epoch `e`: each field's first
        reference time by a live rank in the epoch, `NEVER` when no live rank reads it."""
        tab = self._tables.get(e)
        if tab is not None:
            return tab
        tl = self.timeline
        n, w = tl.n_fields, tl.world_size
        perm = tl.epoch(e).perm
        # Only the live ranks' reads: rank r reads permutation index p * w + r at position p (< its schedule's
        # length), so the cost is what the ranks read, however large the world (10^8 ranks of one field each).
        live = [(r, i) for r, i in self.index.items() if r < w]
        times = np.full(n, NEVER, dtype=np.int64)
        seconds: dict[int, int] = {}
        if live and tl.length:
            ranks = np.array([r for r, _ in live], dtype=np.int64)[:, None]
            slot = np.array([i for _, i in live], dtype=np.int64)[:, None]
            pos = np.arange(tl.length, dtype=np.int64)[None, :]
            index = (pos * w + ranks).ravel()
            t = (((e - self.origin) * self.bpe + pos // self.b) * self.step_span + slot * self.b + pos % self.b).ravel()
            order = np.argsort(index, kind="stable")     # a field's first read is the one of lowest index
            index, t = index[order], t[order]
            fields = perm[index % n]
            _, first = np.unique(fields, return_index=True)
            times[fields[first]] = t[first]
            if len(first) < len(fields):                 # the padded tail (without drop_last) repeats the head
                again = np.ones(len(fields), dtype=bool)
                again[first] = False
                for f, tf in zip(fields[again].tolist(), t[again].tolist()):
                    seconds[f] = tf
        tab = self._tables[e] = (times, array.array("q", times.tobytes()), seconds)
        for old in [k for k in self._tables if k < e - 2]:
            del self._tables[old]
        return tab

    def next_use_after(self, f: int, t: int, basis: Sequence[int]) -> int:
        """The first reference to `f` (or a field it stands in for) after time `t` and not before its rank's
        `basis` time, within `t`'s epoch and the next; `NEVER` if none."""
        fields = self.timeline.stand_ins(f)
        e = t // self.epoch_span + self.origin
        for epoch in (e, e + 1):
            _, times, seconds = self.table(epoch)
            best = NEVER
            for g in fields:
                u = times[g]
                if t < u < best and u >= basis[(u % self.step_span) // self.b]:
                    best = u
                u = seconds.get(g, NEVER) if seconds else NEVER
                if t < u < best and u >= basis[(u % self.step_span) // self.b]:
                    best = u
            if best < NEVER:
                return best
        return NEVER

    def next_uses(self, fields: np.ndarray, basis: Sequence[int]) -> np.ndarray:
        """Each field's first reference at or after its rank's `basis` time (vectorised), within the epochs from
        the earliest basis to the one after the latest; `NEVER` if none."""
        basis_arr = np.asarray(basis, dtype=np.int64)
        out = np.full(len(fields), NEVER, dtype=np.int64)
        if not len(fields):
            return out
        first = int(basis_arr.min()) // self.epoch_span + self.origin
        last = int(basis_arr.max()) // self.epoch_span + self.origin
        for e in self._epochs_between(basis_arr, first, last):
            times, _, seconds = self.table(e)
            t = times[fields]
            ok = (t < NEVER)
            ok[ok] = t[ok] >= basis_arr[(t[ok] % self.step_span) // self.b]
            out = np.where((out == NEVER) & ok, t, out)
            if seconds:   # a padded second read after a consumed first one
                for i, f in enumerate(fields.tolist()):
                    u = seconds.get(f)
                    if u is not None and out[i] == NEVER and u >= basis_arr[(u % self.step_span) // self.b]:
                        out[i] = u
        if len(self.timeline.quarantine):
            for i, f in enumerate(fields.tolist()):
                if len(self.timeline.stand_ins(f)) > 1:
                    out[i] = self._first_use_of_group(f, basis, first, last)
        return out

    def _epochs_between(self, basis: np.ndarray, first: int, last: int) -> list[int]:
        """The epochs the ranks' next uses lie in: from the earliest basis to the one after the latest, or, for
        ranks epochs apart (a client naming far epochs), each rank's epoch and the next."""
        if last - first <= 4:
            return list(range(first, last + 2))
        return sorted({int(b) // self.epoch_span + self.origin + d for b in basis for d in (0, 1)})

    def _first_use_of_group(self, f: int, basis: Sequence[int], first: int, last: int) -> int:
        best = NEVER
        for e in self._epochs_between(np.asarray(basis, dtype=np.int64), first, last):
            _, times, seconds = self.table(e)
            for g in self.timeline.stand_ins(f):
                for u in (times[g], seconds.get(g, NEVER)):
                    if u < best and u >= basis[(u % self.step_span) // self.b]:
                        best = u
            if best < NEVER:
                return best
        return best

    def batches(self, start: Sequence[int]) -> Iterator[tuple[int, int, int, int, list[int]]]:
        """(time of the first read, rank, epoch, position of the first read, fields) of every rank's batch from
        its `start` time on (a batch begun before it: its rest), in time order, substitutes applied; endless."""
        tl = self.timeline
        b, bpe, length = self.b, self.bpe, tl.length
        if not length or not self.ranks:
            return
        step = min(start) // self.step_span
        while True:
            e, k = divmod(step, bpe)
            e += self.origin
            for i, r in enumerate(self.ranks):
                base = step * self.step_span + i * b
                lo = max(0, start[i] - base)
                hi = min(b, length - k * b)
                if lo >= hi:
                    continue
                reads = np.arange(k * b + lo, k * b + hi, dtype=np.int64) * tl.world_size + r
                fields = tl.epoch(e).perm[reads % tl.n_fields].tolist()   # = tl.order(r, e)[k*b+lo : k*b+hi]
                if len(tl.quarantine):
                    fields = [tl.substitute(f) for f in fields]
                yield base + lo, r, e, k * b + lo, fields
            step += 1

    def references(self, start: Sequence[int]) -> Iterator[tuple[int, int, int, int, int]]:
        """(time, rank, epoch, position, field) of every read from each rank's `start` time on, in time order."""
        for t, r, e, p, fields in self.batches(start):
            for o, f in enumerate(fields):
                yield t + o, r, e, p + o, f
