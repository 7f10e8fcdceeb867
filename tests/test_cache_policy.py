"""`belady` prefetching loses no hit to offline MIN: the eviction rule on SlotCache, MIN's "doomed" residents,
the real Job in-process (instant store), and a real daemon against moto's S3 counting GETs.

The bound is prefetchd.bounds.simulate(): a demand-fetch cache of `cache_size` fields over the same schedule.
A use is a hit only when its slot already served a use since it was filled (a prefetched field's first use is
a miss), so the daemon's misses per epoch compare one to one with the bound's.
"""

from __future__ import annotations

import asyncio
import io
import itertools
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
from prefetchd.planner.min_run import MinRun
from prefetchd.bounds import schedule_sequence, simulate
from prefetchd.preprocess import Preprocessing
from prefetchd.quarantine import Quarantine
from prefetchd.schedule import schedule
from prefetchd.shm.arena import Arena, SlotState
from prefetchd.timeline import NEVER, Horizon, RankState, Timeline

RAW = {"illum": False, "clahe": False, "rescale": False}
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def min_misses(n: int, cache: int, epochs: int, batch: int, seed: int = 0) -> list[int]:
    """Misses per epoch of offline MIN (the benchmark's bound) over world size 1's schedule."""
    seq = schedule_sequence(n, epochs, seed, batch)
    return [round((1 - rate) * len(e)) for rate, e in zip(simulate(seq, cache, "belady"), seq)]


# ---- the timeline's positions and the horizon's reference times --------------------------------


@pytest.mark.parametrize("n,world,batch,drop_last", [(10, 1, 3, False), (10, 3, 2, False), (11, 4, 2, True),
                                                      (9, 4, 4, False), (6, 4, 2, False), (4, 10, 2, False),
                                                      (12, 8, 3, True)])
def test_uses_are_the_schedules_positions(n, world, batch, drop_last):
    timeline = Timeline(n, 3, world, batch, drop_last, Quarantine(n))
    for e in (0, 1):
        orders = [schedule(n, 3, e, r, world, batch, drop_last).tolist() for r in range(world)]
        for f in range(n):
            expected = sorted((r, p) for r in range(world) for p, g in enumerate(orders[r]) if g == f)
            assert sorted(timeline.uses(f, e)) == expected
            for r in range(world):   # one rank's, solved directly (what the lru planner asks)
                assert sorted(timeline.uses(f, e, r)) == [(q, p) for q, p in expected if q == r]
            assert all(timeline.order(r, e)[p] == f for r, p in expected)


def brute_refs(n, seed, world, batch, ranks, epochs):
    """(time, rank, field) of every read in lockstep order: batch k of each live rank, then batch k + 1."""
    out = []
    for e in range(epochs):
        orders = {r: schedule(n, seed, e, r, world, batch).tolist() for r in ranks}
        for k in range(len(orders[ranks[0]]) // batch + (len(orders[ranks[0]]) % batch > 0)):
            for r in ranks:
                out += [(r, e, p, orders[r][p]) for p in range(k * batch, min((k + 1) * batch, len(orders[r])))]
    return out


def test_horizon_orders_reads_in_lockstep_and_finds_next_uses():
    n, world, batch = 9, 3, 2
    quarantine = Quarantine(n)
    timeline = Timeline(n, 0, world, batch, False, quarantine)
    ranks = [0, 2]                      # rank 1 is not attached to this daemon
    h = Horizon(timeline, ranks)
    refs = brute_refs(n, 0, world, batch, ranks, 3)
    got = list(itertools.islice(h.references([0, 0]), len(refs)))
    assert [(r, e, p, f) for _, r, e, p, f in got] == refs
    times = [t for t, *_ in got]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(h.time(r, e, p) == t for t, r, e, p, _ in got)
    basis = [0, h.time(2, 0, 3)]        # rank 2 has read three fields already
    for i, (t, r, e, p, f) in enumerate(got[: len(got) // 2]):
        later = [u for u, r2, e2, p2, g in got[i + 1:] if g == f and e2 <= e + 1 and u >= basis[ranks.index(r2)]]
        assert h.next_use_after(f, t, basis) == (later[0] if later else NEVER), (t, f)
    fields = np.arange(n)
    first = [next((u for u, r2, e2, p2, g in got if g == f and u >= basis[ranks.index(r2)] and e2 <= 1), NEVER)
             for f in range(n)]
    assert h.next_uses(fields, basis).tolist() == first
    # a quarantined field's reads count for its substitute (and it is read nowhere)
    q = got[4][4]
    quarantine.add(q, "test")
    h = Horizon(timeline, ranks)
    sub = timeline.substitute(q)
    assert sub != q and q in timeline.stand_ins(sub)
    subs = [f for *_, f in itertools.islice(h.references([0, 0]), len(refs))]
    assert q not in subs and subs[4] == sub
    assert h.next_uses(np.array([sub]), [0, 0])[0] == next(t for t, *_, g in got if g in (sub, q))


# ---- MIN run ahead of the ranks ------------------------------------------------------------


def min_misses_from(residents, capacity, refs):
    """Misses of offline MIN over the field sequence `refs`, from a cache holding `residents`."""
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


@pytest.mark.parametrize("n,capacity,batch,seed", [(32, 8, 4, 0), (48, 12, 4, 1), (40, 20, 4, 2), (30, 7, 3, 3)])
def test_min_run_from_an_empty_cache_misses_what_offline_min_misses(n, capacity, batch, seed):
    timeline = Timeline(n, seed, 1, batch, False, Quarantine(n))
    h = Horizon(timeline, [0])
    run = MinRun(h, [0], [], capacity)
    epochs = 3
    run.advance(epochs * h.epoch_span)
    per_epoch = [0] * epochs
    for t, *_ in run.misses:
        per_epoch[t // h.epoch_span] += 1
    # the bound looks at the whole future; the run at its epoch and the next: equal on all but the last epoch
    assert per_epoch[:-1] == min_misses(n, capacity, epochs, batch, seed)[:-1]


def test_victims_are_not_read_between_their_last_read_and_mins_eviction():
    n, capacity, batch = 40, 10, 4
    timeline = Timeline(n, 5, 2, batch, False, Quarantine(n))
    h = Horizon(timeline, [0, 1])
    run = MinRun(h, [0, 0], [], capacity)
    run.advance(2 * h.epoch_span)
    reads = list(itertools.islice(h.references([0, 0]), 2 * n))
    assert run._evicted_at, "a cache of 10 out of 40 fields evicts"
    for f, ids in run._pending.items():
        for i in ids:
            evicted = run._evicted_at[i]
            last = max((t for t, *_, g in reads if g == f and t < evicted), default=None)
            assert not any(last is not None and last < t < evicted for t, *_, g in reads if g == f)


def test_an_enabled_victim_swapped_for_the_first_miss_loses_no_hit():
    """From random caches: evicting any victim that is free at once (not read before MIN evicts it) to fetch the
    first miss leaves MIN one miss fewer over the same reads (the eviction was a MIN miss anyway)."""
    rng = np.random.default_rng(0)
    n, batch = 16, 1     # batch 1: the run's MIN (a batch's reads are simultaneous) is the classic one
    timeline = Timeline(n, 7, 1, batch, False, Quarantine(n))
    h = Horizon(timeline, [0])
    refs = [f for *_, f in itertools.islice(h.references([0]), 2 * n)]
    checked = 0
    for _ in range(100):
        capacity = int(rng.integers(3, 9))
        residents = rng.choice(n, capacity, replace=False).tolist()
        run = MinRun(h, [0], residents, capacity)
        run.advance(h.epoch_span)          # reads within the first epoch (nothing beyond its next one matters)
        base = min_misses_from(residents, capacity, refs)
        x = next(f for f in refs if f not in residents)
        for _, y in list(run.ready):
            swapped = [f for f in residents if f != y] + [x]
            assert min_misses_from(swapped, capacity, refs) <= base - 1, (residents, capacity, y, x)
            checked += 1
    assert checked > 50


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


def unread_fields(timeline, rank, epochs, count):
    """Fields `rank` does not read in `epochs`: MIN's first victims, free at once."""
    read = {g for e in epochs for g in timeline.order(rank, e).tolist()}
    return [f for f in range(timeline.n_fields) if f not in read][:count]


def test_a_prefetch_takes_only_a_victim_that_is_free_to_go(cache):
    """Four residents the attached rank never reads: MIN evicts all four for its first misses. Leased, filling
    and protected ones are held back (retried after a release); one READY and unprotected is evicted."""
    timeline = Timeline(24, 1, 2, 2, False, Quarantine(24))   # rank 1 reads elsewhere: not attached here
    h = Horizon(timeline, [0])
    residents = unread_fields(timeline, 0, (0, 1), 4)
    assert len(residents) == 4
    slots = {f: fill(cache, f) for f in residents}
    cache.lease(slots[residents[0]])                 # leased: never
    cache.evict(slots[residents[1]])
    cache.begin_fill(99, slots[residents[1]])        # filling: never (99 stands in its slot, not a victim)
    run = MinRun(h, [0], residents, 4)
    protected = {residents[2]}
    until = h.epoch_span
    assert run.take_victim(cache, protected, released=[0], until=until) == slots[residents[3]]
    assert cache.lookup(residents[3]) is None
    assert run.take_victim(cache, protected, released=[0], until=until) is None   # the rest must wait
    assert cache.lookup(residents[0]) == slots[residents[0]] and cache.lookup(residents[2]) == slots[residents[2]]
    cache.release(slots[residents[0]])
    run.retry_held()
    assert run.take_victim(cache, protected, released=[0], until=until) == slots[residents[0]]
    run.retry_held()
    assert run.take_victim(cache, set(), released=[0], until=until) == slots[residents[2]]


def test_a_victim_read_since_the_basis_waits_until_that_read_is_released(cache):
    timeline = Timeline(8, 0, 1, 1, False, Quarantine(8))
    h = Horizon(timeline, [0])
    order = timeline.order(0, 0).tolist()
    run = MinRun(h, [0], [], 2)
    run.advance(h.time(0, 0, 3))               # misses at 0, 1 fill the cache; the one at 2 evicts
    assert [f for *_, f in run.misses] == order[:3]
    for f in order[:2]:                         # reality followed the plan: both are in slots
        fill(cache, f)
    (victim,) = [f for f, ids in run._pending.items() if ids]
    read_at = order.index(victim)
    until = h.time(0, 0, 3)
    slot = cache.lookup(victim)
    assert run.take_victim(cache, set(), released=[h.time(0, 0, read_at)], until=until) is None
    assert run.take_victim(cache, set(), released=[h.time(0, 0, read_at) + 1], until=until) == slot
    assert cache.lookup(victim) is None


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


def test_the_horizon_reads_epochs_ahead_without_touching_the_served_schedules_and_stays_bounded():
    """The planner's horizon reads a few epochs ahead from the epoch permutations, not from the ranks' cached
    schedules (those keep a few epochs around the newest one named, issue #16): reading ahead never evicts
    the schedule being served, and the permutations kept stay a few however many epochs are named."""
    from prefetchd.timeline import KEEP_EPOCHS

    n, world, batch = 64, 2, 4
    timeline = Timeline(n, 0, world, batch, False, Quarantine(n))
    served = timeline.order(0, 7)
    horizon = Horizon(timeline, [0, 1])
    start = [horizon.time(r, 7, 0) for r in (0, 1)]
    reads = list(itertools.islice(horizon.references(start), 4 * n))   # epochs 7 to 10
    assert {e for _, _, e, _, _ in reads} == {7, 8, 9, 10}
    for t, r, e, p, f in reads:
        assert f == schedule(n, 0, e, r, world, batch)[p]
    assert timeline.order(0, 7) is served and sorted(k[1] for k in timeline._orders if k[0] == 0) == [7]
    for e in np.random.default_rng(0).integers(0, 10**6, 50):
        timeline.epoch(int(e))
    assert len(timeline._epochs) == KEEP_EPOCHS


def test_a_horizon_at_epoch_2_63_counts_time_from_its_origin():
    """Any 64-bit epoch is a seeded permutation (issue #16): the horizon's times start at its origin epoch, so
    they stay far below NEVER and int64 however far the epoch, and a rank moving far away asks for a new one."""
    n, world, batch = 24, 2, 4
    far = 2**63 - 2
    timeline = Timeline(n, 0, world, batch, False, Quarantine(n))
    horizon = Horizon(timeline, [0, 1], origin=far)
    start = [horizon.time(r, far, 4) for r in (0, 1)]
    assert max(start) < 2 * horizon.epoch_span
    for t, r, e, p, f in itertools.islice(horizon.references(start), 2 * n):
        assert f == schedule(n, 0, e, r, world, batch)[p] and horizon.position_of(t) == (e, p) and t < NEVER
    uses = horizon.next_uses(np.arange(n, dtype=np.int64), start)
    assert (uses < NEVER).all() and (uses >= min(start)).all()
    assert not horizon.far([far, far + 1]) and horizon.far([0]) and horizon.far([far - 1])


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
    # MIN's own prefetches are never thrown away unused; a guarded eviction (latency first: this consumer keeps
    # a batch longer than a fill takes once fills are fast) may evict a field not read yet, e.g. a shape sample
    assert job["evicted_unused"] <= job["guarded_evictions"]
    # every miss is one fetch of 5 channels; a prefetch beyond the last epoch may add a few unused fields
    assert gets == 5 * job["fields_fetched"]
    assert sum(misses) <= job["fields_fetched"] <= sum(misses) + cache_size
    lru_misses = results["lru"][0]
    assert sum(lru_misses) >= sum(misses)
