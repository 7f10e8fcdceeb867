"""The local-disk tier in front of a real S3 store (moto on loopback)."""

from __future__ import annotations

import asyncio

import pytest

from prefetchd.counters import FetchCounters
from prefetchd.disk_tier import DiskTier
from prefetchd.fetch import S3Store
from prefetchd.s3 import make_s3_client


def keys_and_sizes(synthetic, n):
    keys = [k for f in synthetic.manifest.fields for k in f.keys.values()][:n]
    return [(f"{k}", (synthetic.root / k).stat().st_size) for k in keys]


async def read_all(tier, items):
    return [await tier.get(k, size) for k, size in items]


def test_second_pass_is_served_from_disk_and_the_cap_holds(synthetic, tmp_path):
    items = keys_and_sizes(synthetic, 10)
    object_bytes = items[0][1]

    async def run():
        async with make_s3_client({"endpoint_url": synthetic.endpoint_url}) as client:
            counters = FetchCounters()
            store = S3Store(client, synthetic.bucket, asyncio.Semaphore(4), counters)
            tier = DiskTier(store, tmp_path / "tier", max_bytes=100 * object_bytes, namespace="a")
            first = await read_all(tier, items)
            gets_after_first = counters.gets
            second = await read_all(tier, items)
            assert second == first and counters.gets == gets_after_first == len(items)
            assert tier.hits == len(items)
            for (key, _), data in zip(items, second):
                assert data == (synthetic.root / key).read_bytes()

            small = DiskTier(store, tmp_path / "small", max_bytes=3 * object_bytes + 10, namespace="a")
            await read_all(small, items)
            assert small.used_bytes <= small.max_bytes and len(small.status()) and small.status()["files"] == 3

            restarted = DiskTier(store, tmp_path / "tier", max_bytes=100 * object_bytes, namespace="a")
            assert restarted.used_bytes == tier.used_bytes  # entries survive a daemon restart
            other = DiskTier(store, tmp_path / "tier", max_bytes=100 * object_bytes, namespace="b")
            await other.get(*items[0])
            assert other.misses == 1  # another endpoint/bucket never reuses an entry

    asyncio.run(run())


def test_a_damaged_entry_is_fetched_again(synthetic, tmp_path):
    key, size = keys_and_sizes(synthetic, 1)[0]

    async def run():
        async with make_s3_client({"endpoint_url": synthetic.endpoint_url}) as client:
            store = S3Store(client, synthetic.bucket, asyncio.Semaphore(4), FetchCounters())
            tier = DiskTier(store, tmp_path / "tier", max_bytes=10**9, namespace="a")
            await tier.get(key, size)
            tier.path_of(key).write_bytes(b"truncated")
            assert await tier.get(key, size) == (synthetic.root / key).read_bytes()
            assert tier.misses == 2

    asyncio.run(run())


def test_daemon_with_a_disk_tier_reads_a_dataset_once_from_the_network(daemon, synthetic, tmp_path):
    from prefetchd.client import attach

    d = daemon(f"disk_cache.dir={tmp_path / 'objects'}", "disk_cache.max_bytes=1000000000")
    raw = dict(illum=False, clahe=False, rescale=False, cache_size=24)
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="first", **raw) as stream:
        first = {i: b.images[k].copy() for b in stream.epoch(0) for k, i in enumerate(b.ids)}
        gets = stream.status()["gets"]
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="second", **raw) as stream:
        for batch in stream.epoch(0):
            for k, field_id in enumerate(batch.ids):
                assert (batch.images[k] == first[field_id]).all()
        status = stream.status()
    assert status["gets"] == gets  # the second job's arena was cold, the disk tier was not
    assert status["disk_cache"][0]["hits"] == 5 * 24
