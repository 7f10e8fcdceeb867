"""`belady` prefetching loses no hit to offline MIN: the eviction rule on SlotCache, MIN's "doomed" residents,
the real Job in-process (instant store), and a real daemon against moto's S3 counting GETs.

The bound is prefetchd.bounds.simulate(): a demand-fetch cache of `cache_size` fields over the same schedule.
A use is a hit only when its slot already served a use since it was filled (a prefetched field's first use is
a miss), so the daemon's misses per epoch compare one to one with the bound's.
"""

from __future__ import annotations

import asyncio
import io
import math
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from prefetchd.dev import synth
from prefetchd.cache import SlotCache
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.counters import FetchCounters
from prefetchd.index import Field, Index
from prefetchd.filler import quarantine_field
from prefetchd.job import Job
from prefetchd.options import JobSpec
from prefetchd.planner.belady import farthest, min_evictions, take_doomed_slot
from prefetchd.bounds import schedule_sequence, simulate
from prefetchd.preprocess import Preprocessing
from prefetchd.quarantine import Quarantine
from prefetchd.schedule import schedule
from prefetchd.shm.arena import Arena, SlotState
from prefetchd.timeline import RankState, Timeline

RAW = {"illum": False, "clahe": False, "rescale": False}
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def min_misses(n: int, cache: int, epochs: int, batch: int, seed: int = 0) -> list[int]:
    """Misses per epoch of offline MIN (the benchmark's bound) over world size 1's schedule."""
    seq = schedule_sequence(n, epochs, seed, batch)
    return [round((1 - rate) * len(e)) for rate, e in zip(simulate(seq, cache, "belady"), seq)]


# ---- the rule on SlotCache -------------------------------------------------------------------


@pytest.fixture
def cache():
    arena = Arena.create(f"prefetchd-test-{uuid.uuid4().hex[:8]}", 4, (1, 2, 2))
    yield SlotCache(arena)
    arena.destroy()


def fill(cache: SlotCache, field: int) -> int:
    slot = cache.take_free()
    cache.begin_fill(field, slot)
    cache.finish_fill(slot)
    return slot


def test_prefetch_takes_a_free_slot_without_evicting(cache):
    fill(cache, 10)
    assert take_doomed_slot(cache, iter([10]), set()) is not None  # 3 slots still free
    assert cache.lookup(10) is not None and cache.evicted_unused == 0


def test_prefetch_evicts_only_a_doomed_field_that_is_free_to_go(cache):
    slots = {f: fill(cache, f) for f in (10, 11, 12, 13)}
    cache.lease(slots[10])                         # leased: never
    cache.begin_fill(99, cache.evict(farthest(cache, set(), lambda f: 0 if f != 13 else math.inf)))  # evicts 13
    assert cache.lookup(13) is None
    filling = cache.lookup(99)                      # filling: never
    # MIN evicts 10 (leased), 99 (filling), 11 (protected) and 12, in that order: only 12 may go
    slot = take_doomed_slot(cache, iter([10, 99, 11, 12]), protected={11})
    assert slot == slots[12] and cache.lookup(12) is None
    assert cache.state[slots[10]] == SlotState.LEASED and cache.state[filling] == SlotState.FILLING
    assert cache.lookup(11) == slots[11]


def test_prefetch_waits_when_no_doomed_field_can_go(cache):
    slots = {f: fill(cache, f) for f in (10, 11, 12, 13)}
    cache.lease(slots[10])
    assert take_doomed_slot(cache, iter([10, 11]), protected={11}) is None
    assert take_doomed_slot(cache, iter([]), set()) is None   # nothing doomed: MIN keeps every resident
    assert all(cache.lookup(f) == s for f, s in slots.items())
    cache.release(slots[10])                               # once released, the doomed field goes
    assert take_doomed_slot(cache, iter([10]), set()) == slots[10]


def test_prefetch_consumes_the_doomed_sequence_lazily(cache):
    for f in (10, 11, 12, 13):
        fill(cache, f)
    seen = []

    def doomed():
        for f in (11, 12, 13):
            seen.append(f)
            yield f

    take_doomed_slot(cache, doomed(), set())
    assert seen == [11]


# ---- MIN's doomed residents -------------------------------------------------------------------


def doomed_of(residents, capacity, refs):
    """min_evictions over an explicit reference string (times = indices)."""
    def uses(f):
        return [i for i, g in enumerate(refs) if g == f]

    def next_use(f):
        u = uses(f)
        return u[0] if u else math.inf

    def next_use_after(f, t):
        return next((i for i in uses(f) if i > t), math.inf)

    return list(min_evictions(residents, capacity, enumerate(refs), next_use, next_use_after, max_steps=10_000))


def test_doomed_residents_are_mins_victims_before_their_next_use():
    # cache {1, 2, 3}, refs 4 5 4 5 1 2 3: MIN evicts 3 (used last) for 4, then 2 for 5, and hits 1
    assert doomed_of([1, 2, 3], 3, [4, 5, 4, 5, 1, 2, 3]) == [3, 2]
    # a field brought in and dropped again (4: never reused) is not a resident: not reported
    assert doomed_of([1, 2, 3], 3, [4, 1, 5, 2, 3, 1]) == [3]
    # a field needed before the first miss is never doomed, nor one MIN keeps for a hit
    assert doomed_of([1, 2, 3], 3, [1, 2, 4, 1, 2]) == [3]
    assert doomed_of([1, 2, 3], 3, [1, 2, 3]) == []
    # fields never used again go first
    assert doomed_of([1, 2, 3], 3, [4, 1, 2]) == [3]


def test_evicting_only_doomed_fields_keeps_mins_miss_count_on_random_strings():
    rng = np.random.default_rng(0)
    for _ in range(200):
        refs = rng.integers(0, 12, 60).tolist()
        capacity = int(rng.integers(2, 8))
        residents = list(dict.fromkeys(rng.integers(0, 12, capacity).tolist()))
        base = _min_run(residents, capacity, refs)
        for y in doomed_of(residents, capacity, refs):
            x = next(f for f in refs if f not in residents)  # the first miss, prefetched now
            swapped = [f for f in residents if f != y] + [x]
            assert _min_run(swapped, capacity, refs) <= base - 1, (residents, capacity, refs, y, x)


def _min_run(residents, capacity, refs) -> int:
    cache, misses = set(residents), 0
    for i, f in enumerate(refs):
        if f in cache:
            continue
        misses += 1
        if len(cache) >= capacity:
            def nxt(g):
                return next((j for j in range(i + 1, len(refs)) if refs[j] == g), math.inf)
            cache.remove(max(cache, key=nxt))
        cache.add(f)
    return misses


# ---- the real Job, in-process, with an instant store ----------------------------------------------


class InstantStore:
    def __init__(self):
        self.counters = FetchCounters()
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.full((4, 4), 7, np.uint16))
        self.blob = buf.getvalue()

    async def get(self, key, expected_size=-1, expected_etag=None):
        self.counters.gets += 1
        return self.blob


async def run_job(n: int, cache_size: int, batch: int, epochs: int, policy: str, *, seed: int = 0, world: int = 1,
                  prefetch_factor: int = 1, quarantine: tuple[int, ...] = ()) -> tuple[Job, dict, list[list[str]]]:
    fields = [Field(f"plate/A{i:03d}/1", "b", "plate", f"A{i:03d}", 1, tuple(f"k{i}/{c}" for c in range(5)), (-1,) * 5,
                    None) for i in range(n)]
    spec = JobSpec(f"test-policy-{uuid.uuid4().hex[:8]}", "x", seed, world, batch, False, cache_size, prefetch_factor,
                   policy, Preprocessing(illum=False, rescale=None, clahe=None), CHANNELS)
    pool = ThreadPoolExecutor(2)
    job = Job(spec, Index("x", CHANNELS, fields), InstantStore(), pool, max_fills=6, local_world_size=world)
    await job.start()
    for f in quarantine:
        quarantine_field(job.quarantine, job.index, f, "test")
    served: list[list[str]] = [[] for _ in range(world)]
    try:
        for r in range(world):
            job.add_rank(r)
        for e in range(epochs):
            for k in range(job.batches_per_epoch):
                for r in range(world):  # ranks in lockstep, batch by batch
                    served[r] += (await job.next_batch(r, e, k)).ids
        status = job.status()
    finally:
        await job.close()
        pool.shutdown()
    return job, status, served


@pytest.mark.parametrize("n,cache_size,batch,seed", [(32, 8, 4, 0), (48, 12, 4, 1), (96, 24, 8, 0), (40, 20, 4, 2)])
def test_job_misses_per_epoch_match_offline_min(n, cache_size, batch, seed):
    epochs = 3
    _, status, served = asyncio.run(run_job(n, cache_size, batch, epochs, "belady", seed=seed))
    bound = min_misses(n, cache_size, epochs, batch, seed)
    misses = [status["epochs"][e]["misses"] for e in range(epochs)]
    assert all(abs(m - b) <= 1 for m, b in zip(misses, bound)), (misses, bound)
    assert sum(misses) <= sum(bound) + 1
    assert status["evicted_unused"] == 0  # no fetch wasted: every prefetched field was used before eviction
    order = [f"plate/A{i:03d}/1" for e in range(epochs) for i in schedule(n, seed, e, 0, 1, batch)]
    assert served[0] == order


def test_job_lru_is_not_better_than_belady():
    hits = {}
    for policy in ("lru", "belady"):
        _, status, _ = asyncio.run(run_job(48, 12, 4, 3, policy))
        hits[policy] = status["cache_hits"]
    assert hits["lru"] <= hits["belady"]


def test_two_ranks_get_their_batches_and_hit_about_as_often_as_min():
    n, cache_size, batch, epochs, world = 64, 24, 4, 3, 2
    job, status, served = asyncio.run(run_job(n, cache_size, batch, epochs, "belady", world=world))
    for r in range(world):
        assert served[r] == [f"plate/A{i:03d}/1" for e in range(epochs) for i in schedule(n, 0, e, r, world, batch)]
    per_epoch = []  # the reference string the job saw: batch k of rank 0, then of rank 1, ...
    for e in range(epochs):
        shards = [schedule(n, 0, e, r, world, batch) for r in range(world)]
        per_epoch.append(np.concatenate([s[k * batch:(k + 1) * batch] for k in range(n // world // batch)
                                         for s in shards]))
    bound = [round((1 - h) * n) for h in simulate(per_epoch, cache_size, "belady")]
    misses = [status["epochs"][e]["misses"] for e in range(epochs)]
    # ranks are merged position by position while MIN sees whole batches: a field or two either way
    assert all(m <= b + 2 for m, b in zip(misses, bound)), (misses, bound)


def test_a_quarantined_fields_positions_count_for_its_substitute():
    async def run():
        _, status, served = await run_job(16, 8, 4, 2, "belady", quarantine=(5,))
        return status, served

    status, served = asyncio.run(run())
    assert "plate/A005/1" not in served[0] and served[0].count("plate/A006/1") == 4  # 2 epochs × (5 and 6)
    assert status["evicted_unused"] == 0


def test_a_rank_slower_than_a_fill_gets_its_next_batch_even_when_min_would_wait():
    """While a rank holds batch k, MIN's victims are usually in that batch: the exact rule waits for the release
    and a rank that comes back later than a fill takes would stall on every batch. For such a rank the next
    batch is fetched anyway (a guarded eviction); for a rank that is back at once, and with prefetch_factor 0,
    nothing changes."""
    async def run(prefetch_factor):
        fields = [Field(f"plate/A{i:03d}/1", "b", "plate", f"A{i:03d}", 1, tuple(f"k{i}/{c}" for c in range(5)),
                        (-1,) * 5, None) for i in range(32)]
        spec = JobSpec(f"test-guard-{uuid.uuid4().hex[:8]}", "x", 0, 1, 4, False, 8, prefetch_factor, "belady",
                       Preprocessing(illum=False, rescale=None, clahe=None), CHANNELS)
        pool = ThreadPoolExecutor(2)
        job = Job(spec, Index("x", CHANNELS, fields), InstantStore(), pool, max_fills=6, local_world_size=1)
        await job.start()
        try:
            state = job.add_rank(0)
            for e in range(3):
                for k in range(job.batches_per_epoch):
                    await job.next_batch(0, e, k)      # the rank now holds batch k; the prefetcher has not run
                    nxt = job.planner.next_batches()
                    job.planner.plan()
                    if all(job.cache.lookup(f) is not None for f in nxt):
                        continue
                    assert not job.cache.free          # MIN's victim cannot go yet: the exact rule waits
                    job.pace.fill_s, state.think_s = 0.01, 1.0   # ...but this rank would stall for it
                    job.planner.plan()
                    return job.planner.guarded_evictions, all(job.cache.lookup(f) is not None for f in nxt)
            return None
        finally:
            await job.close()
            pool.shutdown()

    guarded, ready = asyncio.run(run(prefetch_factor=1))
    assert guarded > 0 and ready
    guarded, ready = asyncio.run(run(prefetch_factor=0))
    assert guarded == 0 and not ready


def test_horizon_merges_ranks_and_substitutes():
    quarantine = Quarantine(8)
    timeline = Timeline(8, 0, 2, 2, False, quarantine)
    ranks = [RankState(0), RankState(1)]
    orders = [schedule(8, 0, 0, r, 2, 2).tolist() + schedule(8, 0, 1, r, 2, 2).tolist() for r in (0, 1)]
    h = timeline.horizon(ranks)
    for f in range(8):
        expected = sorted(d for order in orders for d, g in enumerate(order) if g == f)
        assert h.uses(f) == expected
    assert [f for _, f in h.references()][:4] == [orders[0][0], orders[1][0], orders[0][1], orders[1][1]]
    ranks[0].position = 3
    assert timeline.horizon(ranks) is not h and timeline.horizon(ranks).next_use(orders[0][3]) == 0
    q = orders[0][5]
    quarantine.add(q, "test")
    sub = timeline.substitute(q)
    assert 2 in timeline.horizon(ranks).uses(sub) and timeline.horizon(ranks).uses(q) == []


# ---- a real daemon against moto's S3: misses and GETs ---------------------------------------------


@pytest.fixture(scope="module")
def synthetic32(s3, tmp_path_factory):
    """32 small fields (2 plates × 8 wells × 2 sites, 24 × 30 pixels) in their own public bucket."""
    spec = synth.SynthSpec(
        batches={"2020_11_04_CPJUMP1": (("BR00116991", "2020-11-05T19_51_35"), ("BR00117010", "2020-11-08T18_18_00"))},
        wells=("A01", "A02", "A03", "A04", "B01", "B02", "B03", "B04"), sites=2, height=24, width=30, with_illum=False)
    manifest = synth.write_plates(tmp_path_factory.mktemp("synthetic32"), spec)
    synth.upload(manifest, s3.endpoint_url, "policy-jump")
    assert spec.field_count == 32
    return f"JUMPS3MultiView:bucket=policy-jump:prefix={spec.prefix}"


def test_daemon_belady_misses_and_gets_equal_the_offline_bound_and_lru_is_not_better(daemon, synthetic32):
    n, cache_size, batch, epochs = 32, 8, 4, 3
    d = daemon()
    bound = min_misses(n, cache_size, epochs, batch)
    results = {}
    for policy in ("belady", "lru"):
        gets_before = request("status", d.socket)["gets"]
        job_id = f"cache-policy-{policy}-{uuid.uuid4().hex[:8]}"  # unique: other sessions may run daemons too
        with attach(synthetic32, batch_size=batch, seed=0, socket=d.socket, job=job_id, cache_size=cache_size,
                    prefetch_factor=1, policy=policy, **RAW) as stream:
            for epoch in range(epochs):
                assert sum(len(b.ids) for b in stream.epoch(epoch)) == n
            status = stream.status()
        job = next(j for j in status["jobs"] if j["job"] == job_id)
        misses = [job["epochs"][str(e)]["misses"] for e in range(epochs)]
        results[policy] = (misses, job, status["gets"] - gets_before)
    misses, job, gets = results["belady"]
    assert all(abs(m - b) <= 1 for m, b in zip(misses, bound)), (misses, bound)
    assert job["evicted_unused"] == 0
    # every miss is one fetch of 5 channels; a prefetch beyond the last epoch may add a few unused fields
    assert gets == 5 * job["fields_fetched"]
    assert sum(misses) <= job["fields_fetched"] <= sum(misses) + cache_size
    lru_misses = results["lru"][0]
    assert sum(lru_misses) >= sum(misses)
