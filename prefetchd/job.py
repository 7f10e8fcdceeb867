"""One attached training job: it wires the parts of the data path together and serves its ranks' batches.

    index ──► timeline (schedules, cursors, horizon) ──► planner (policy) ──► filler ──► slot ──► `next_batch`

A rank asking for a batch that is not ready always gets it: its missing fields are fetched on demand
(`Planner.fetch_now`); when every slot is leased, filling or protected it waits for the next release or finished
fill. The prefetch loop lets the planner fill ahead whenever a cursor moves, a slot is released or a fill ends.
A use is a hit only when its slot already served a use since it was filled (`SlotCache.lease`): the count of a
demand-fetch cache, comparable with the offline bounds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from prefetchd.cache import SlotCache
from prefetchd.errors import DaemonStopping, ShmError
from prefetchd.fetch import ObjectStore
from prefetchd.field_shape import ShapeDecision
from prefetchd.filler import FIELD_BUDGET_S, Filler, probe
from prefetchd.illum import IllumStore
from prefetchd.index import Index
from prefetchd.pace import Pace
from prefetchd.options import JobSpec
from prefetchd.planner import Planner, make_planner
from prefetchd.quarantine import Quarantine
from prefetchd.shared_fields import SharedFields
from prefetchd.shm.arena import Arena, arena_name
from prefetchd.timeline import RankState, Timeline

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    served: int = 0
    hits: int = 0
    misses: int = 0

    def count(self, hits: list[bool]) -> None:
        self.served += len(hits)
        self.hits += sum(hits)
        self.misses += len(hits) - sum(hits)


@dataclass
class JobStats:
    fields_served: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    stall_s: float = 0.0
    epochs: dict[int, EpochStats] = field(default_factory=lambda: collections.defaultdict(EpochStats))

    def served_batch(self, epoch: int, hits: list[bool], waited_s: float) -> None:
        """Count a batch handed out; `hits[i]`: field i's slot had served a use since it was filled."""
        self.epochs[epoch].count(hits)
        self.fields_served += len(hits)
        self.cache_hits += sum(hits)
        self.cache_misses += len(hits) - sum(hits)
        self.stall_s += waited_s


@dataclass
class Served:
    """A batch handed to a rank: its slots (leased until the rank's next request) and field ids."""

    epoch: int
    batch: int
    slots: list[int]
    ids: list[str]
    generations: list[int]
    waited_s: float
    pixel_size_um: list[float | None] = field(default_factory=list)   # per field, of its source's microscope


@dataclass
class EpochEnd:
    """The rank asked past its epoch's last batch."""

    epoch: int
    batches: int


class Job:
    def __init__(self, spec: JobSpec, index: Index, store: ObjectStore, pool: Executor, *,
                 max_fills: int, local_world_size: int, shm_mode: int = 0o600, shm_gid: int | None = None,
                 shm_budget: int = 0, illum: IllumStore | None = None, shared: SharedFields | None = None,
                 key_space: str = "", field_budget_s: float = FIELD_BUDGET_S):
        self.spec = spec
        self._node = (illum, shared, key_space)   # what this job shares with the daemon's other jobs
        self.index = index
        self.store = store
        self.pool = pool
        self.max_fills = max_fills
        self.local_world_size = local_world_size
        self.field_budget_s = field_budget_s
        self._shm = (shm_mode, shm_gid, shm_budget)
        self.ranks: dict[int, RankState] = {}
        self.stats = JobStats()
        self.pace = Pace()
        self.quarantine = Quarantine(len(index.fields))
        self.timeline = Timeline(len(index.fields), spec.seed, spec.world_size, spec.batch_size, spec.drop_last,
                                 self.quarantine)
        self.arena: Arena | None = None
        self.field_shape: ShapeDecision | None = None
        self.cache: SlotCache | None = None
        self.filler: Filler | None = None
        self.planner: Planner | None = None
        self.idle_since: float | None = None
        self._wake = asyncio.Event()      # the prefetcher: a cursor moved, a slot was released, a fill ended
        self._changed = asyncio.Event()   # waiting ranks: a slot was released or a fill ended
        self._prefetcher: asyncio.Task | None = None
        self.closed = False
        self._ids = index.ids   # one list (a FieldTable holds it; a list of Fields builds it per access)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def n_fields(self) -> int:
        return len(self.index.fields)

    @property
    def batches_per_epoch(self) -> int:
        return self.timeline.batches_per_epoch

    async def start(self) -> None:
        """Decide the field shape from sampled fields of every source, create the arena, start prefetching."""
        s = self.spec
        needed = (s.prefetch_factor + 1) * s.batch_size * self.local_world_size
        if s.cache_size < needed:
            raise ShmError(
                f"cache_size={s.cache_size} fields cannot hold (prefetch_factor + 1) × batch_size × local ranks "
                f"= ({s.prefetch_factor} + 1) × {s.batch_size} × {self.local_world_size} = {needed}: "
                f"raise cache_size to at least {needed} or lower prefetch_factor/batch_size"
            )
        sampled = await probe(self.index, self.store, self.quarantine, self.pool, s.shape,
                              self.field_budget_s)
        self.field_shape = sampled.decision
        log.info("job %s fields are %s: %s", s.job, "×".join(map(str, sampled.decision.size)),
                 "; ".join(sampled.decision.groups))
        shape = (len(self.index.channels), *sampled.decision.size)
        mode, gid, budget = self._shm
        self.arena = Arena.create(arena_name(s.job), s.cache_size, shape, mode=mode, gid=gid, budget_bytes=budget)
        self.cache = SlotCache(self.arena)
        illum, shared, key_space = self._node
        self.filler = Filler(self.index, self.store, self.pool, s.preprocessing, self.arena, self.cache,
                             self.quarantine, self.pace, on_done=self._slots_changed, fit=sampled.decision.option,
                             illum=illum, shared=shared, key_space=key_space, budget_s=self.field_budget_s)
        self.planner = make_planner(s.policy, batch_size=s.batch_size, cache_size=s.cache_size,
                                    prefetch_factor=s.prefetch_factor, max_fills=self.max_fills, ranks=self.ranks,
                                    timeline=self.timeline, cache=self.cache, filler=self.filler, pace=self.pace)
        for f, blobs in sampled.fetched[:max(1, s.cache_size // 2)]:   # leave most slots to the planner
            self.filler.start(f, self.cache.take_free(), blobs)
        self._prefetcher = asyncio.create_task(self._prefetch_loop(), name=f"prefetch-{s.job}")

    async def close(self) -> None:
        self.closed = True
        if self._prefetcher is not None:
            self._prefetcher.cancel()
            await asyncio.gather(self._prefetcher, return_exceptions=True)
        if self.filler is not None:
            await self.filler.close()
        self._changed.set()
        if self.arena is not None:
            self.arena.destroy()
            self.arena = None

    # ---- ranks -----------------------------------------------------------------------------

    def add_rank(self, rank: int) -> RankState:
        state = self.ranks.get(rank)
        if state is None:
            state = self.ranks[rank] = RankState(rank)
        state.connected, state.detached = True, False
        state.replied_at = None  # the gap across a reconnect is not think time
        self.idle_since = None
        self._wake.set()
        return state

    def disconnect_rank(self, rank: int, *, detach: bool = False) -> None:
        state = self.ranks.get(rank)
        if state is None or self.closed:
            return
        self._release_all(state)
        state.connected = False
        state.detached = detach
        if not any(r.connected for r in self.ranks.values()):
            self.idle_since = time.monotonic()
        self._wake.set()

    @property
    def all_detached(self) -> bool:
        return bool(self.ranks) and all(r.detached for r in self.ranks.values())

    def _release_all(self, state: RankState) -> None:
        if self.closed or self.cache is None:
            state.leased = []
            return
        for slot in state.leased:
            self.cache.release(slot)
        state.leased = []
        self._changed.set()

    def release(self, rank: int, slots: list[int]) -> None:
        state = self.ranks[rank]
        for slot in slots:
            if slot in state.leased:
                state.leased.remove(slot)
                self.cache.release(slot)
        self._slots_changed()

    def _slots_changed(self) -> None:
        self._changed.set()
        self._wake.set()

    # ---- serving ---------------------------------------------------------------------------

    async def orders_ready(self, rank: int, epoch: int) -> None:
        """Compute the schedules of `epoch` and the next (what the horizon reads) off the event loop: a
        permutation of millions of fields takes most of a second, and other jobs' ranks are waiting."""
        loop = asyncio.get_running_loop()
        for e in (epoch, epoch + 1):
            if not self.timeline.has(rank, e):
                self.timeline.put(rank, e, await loop.run_in_executor(self.pool, self.timeline.compute, rank, e))

    async def next_batch(self, rank: int, epoch: int, batch: int) -> Served | EpochEnd:
        state = self.ranks[rank]
        state.asked()
        await self.orders_ready(rank, epoch + 1 if batch >= self.batches_per_epoch else epoch)
        self._release_all(state)
        if batch >= self.batches_per_epoch:
            state.epoch, state.position = epoch + 1, 0
            state.replied_at = time.monotonic()
            self._wake.set()
            return EpochEnd(epoch, self.batches_per_epoch)
        b = self.spec.batch_size
        state.epoch, state.position = epoch, batch * b
        self._wake.set()
        started = time.monotonic()
        mapped = await self._wait_ready(self.timeline.batch(rank, epoch, batch))
        waited = time.monotonic() - started
        state.stall_s += waited
        state.batches += 1
        slots = [self.cache.lookup(f) for f in mapped]
        self.stats.served_batch(epoch, [self.cache.lease(slot) for slot in slots], waited)
        state.leased = slots
        state.position = (batch + 1) * b
        state.replied_at = time.monotonic()
        self.pace.consumed(rank, len(mapped))
        self._wake.set()
        ids = self._ids
        return Served(epoch, batch, slots, [ids[f] for f in mapped],
                      [int(self.arena.table["generation"][s]) for s in slots], waited,
                      self.index.pixel_size_um(mapped))

    async def _wait_ready(self, fields: list[int]) -> list[int]:
        """Start or join the fills of a batch's fields and return (substitutes applied) once all are in slots."""
        while True:
            if self.closed:
                raise DaemonStopping("the daemon is shutting down; reattach when it is back")
            self._changed.clear()  # cleared before checking, so no completion can slip between
            mapped = [self.timeline.substitute(f) for f in fields]
            if all(self.cache.is_ready(f) for f in mapped):
                return mapped
            self.planner.fetch_now(mapped)
            await self._changed.wait()

    async def _prefetch_loop(self) -> None:
        while not self.closed:
            self._wake.clear()
            try:
                self.planner.plan()
            except Exception:  # keep prefetching for the other fields; next() still fills on demand
                log.exception("prefetch planning failed for job %s", self.spec.job)
            await self._wake.wait()

    # ---- reporting -------------------------------------------------------------------------

    def field_shape_info(self) -> dict | None:
        """The slots' (H, W), how other sizes are made that size, and per source what sampling found."""
        d = self.field_shape
        if d is None:
            return None
        return {"size": list(d.size), "option": d.option.to_dict() if d.option else None, "sources": list(d.groups),
                "pixel_size_um": {name: o.get("pixel_size_um") for name, o in self.index.optics.items()}}

    def status(self) -> dict:
        s, st = self.spec, self.stats
        served = st.fields_served
        arena, cache, planner = self.arena, self.cache, self.planner
        return {
            "job": s.job,
            "dataset": s.dataset,
            "fields": self.n_fields,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "cache_size": s.cache_size,
            "policy": s.policy,
            "prefetch_factor": s.prefetch_factor,
            "preprocessing": s.preprocessing.to_dict(),
            "shape": list(arena.layout.shape) if arena else None,
            "field_shape": self.field_shape_info(),
            "shm_name": arena.layout.name if arena else None,
            "shm_bytes": arena.layout.total_bytes if arena else 0,
            "ranks": {r.rank: {"epoch": r.epoch, "position": r.position, "connected": r.connected,
                               "leased": len(r.leased), "think_s": r.think_s, "stall_s": r.stall_s,
                               "batches": r.batches} for r in self.ranks.values()},
            "fields_served": served,
            "cache_hits": st.cache_hits,
            "cache_misses": st.cache_misses,
            "hit_rate": st.cache_hits / served if served else 0.0,
            "hit_rate_bound": min(1.0, s.cache_size / self.n_fields) if self.n_fields else 0.0,
            "fields_fetched": self.filler.fields_fetched if self.filler else 0,
            "fields_shared": self.filler.fields_shared if self.filler else 0,
            "evicted_unused": cache.evicted_unused if cache else 0,
            "guarded_evictions": planner.guarded_evictions if planner else 0,
            "planning_cpu_s": planner.planning_s if planner else 0.0,
            "stall_s": st.stall_s,
            "epochs": {e: {"served": v.served, "hits": v.hits, "misses": v.misses,
                           "hit_rate": v.hits / v.served if v.served else 0.0}
                       for e, v in sorted(st.epochs.items())},
            "quarantined": [{"field": self.index.fields[f].id, "reason": r} for f, r in self.quarantine.items()],
            "slots": cache.counts() if cache else {},
            "filling": len(self.filler.filling) if self.filler else 0,
            "prefetch_depth": planner.prefetch_depth() if planner else 0,
            "fill_s": self.pace.fill_s,
            "consume_fields_per_s": self.pace.rate_per_rank,
        }
