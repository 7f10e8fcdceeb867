"""The daemon's object stores: one S3 client (LISTs, URLs), one GET transport (`get_transport.py`: obstore by
default), one GET limiter, one set of fetch counters and the disk tiers, shared by every job; `for_dataset` hands
a job the store of its dataset."""

from __future__ import annotations

import contextlib
from typing import Any

from prefetchd.concurrency import DEFAULT_MINIMUM, AdaptiveConcurrency
from prefetchd.counters import FetchCounters
from prefetchd.dataset import DatasetSpec
from prefetchd.disk_tier import DiskTier
from prefetchd.fetch import ObjectStore
from prefetchd.get_transport import GetTransport, make_get_transport
from prefetchd.s3 import make_s3_client, resolve_endpoint


def limiter_bounds(s3: dict[str, Any]) -> tuple[int, int]:
    """(maximum, minimum) GETs in flight for an `s3:` block; `get_concurrency: fixed` pins the limit."""
    maximum = max(1, int(s3["max_concurrency"]))
    return maximum, maximum if s3.get("get_concurrency", "adaptive") == "fixed" else min(DEFAULT_MINIMUM, maximum)


def make_limiter(s3: dict[str, Any]) -> AdaptiveConcurrency:
    """The GET limiter for an `s3:` config block."""
    maximum, minimum = limiter_bounds(s3)
    return AdaptiveConcurrency(maximum, minimum=minimum)


class Stores:
    def __init__(self, s3: dict[str, Any], disk_cache: dict[str, Any]):
        self.s3 = s3
        self.disk_cache = disk_cache
        self.counters = FetchCounters()
        # GETs in flight, all jobs together: adapts to throughput and backs off on 503 SlowDown.
        self.limiter = make_limiter(s3)
        self.disk_tiers: dict[str, DiskTier] = {}
        self.s3client: Any = None
        self.transport: GetTransport | None = None    # how object GETs are made (get_transport.py)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Create the S3 client and the GET transport; `stack` closes them."""
        self.s3client = await stack.enter_async_context(make_s3_client(self.s3))
        self.transport = await stack.enter_async_context(make_get_transport(self.s3))

    @property
    def endpoint(self) -> str | None:
        return resolve_endpoint(self.s3.get("endpoint_url"))

    def reload(self, s3: dict[str, Any]) -> None:
        """A reloaded `s3:` block: the live limiter takes the new bounds (attached jobs hold this limiter)."""
        if (int(s3["max_concurrency"]), s3.get("get_concurrency")) != \
                (int(self.s3["max_concurrency"]), self.s3.get("get_concurrency")):
            self.limiter.set_bounds(*limiter_bounds(s3))
        self.s3 = s3

    def verify_md5(self) -> bool:
        setting = self.s3.get("verify_md5")
        if setting == "auto":  # TLS authenticates the bytes already; plain http (a local mirror) does not
            endpoint = self.endpoint
            return bool(endpoint) and endpoint.startswith("http://")
        return bool(setting)

    def for_dataset(self, spec: DatasetSpec) -> ObjectStore:
        return spec.storage.make_store(self)

    def on_disk(self, namespace: str, store: ObjectStore) -> ObjectStore:
        """`store` behind the disk tier of `namespace` (one per bucket and endpoint), when `disk_cache` is on."""
        tier = self.disk_cache
        if not (tier["dir"] and tier["max_bytes"]):
            return store
        if namespace not in self.disk_tiers:
            self.disk_tiers[namespace] = DiskTier(store, tier["dir"], tier["max_bytes"], namespace)
        return self.disk_tiers[namespace]

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "bytes_fetched": c.bytes_fetched,
            "gets": c.gets,
            "fetch_mb_per_s": c.meter.rate() / 1e6,
            "inflight_requests": c.inflight,
            "retries": c.retries,
            "fetch_errors": c.errors,
            # `gets` and `bytes_fetched` count both; illumination files apart from images:
            "image_gets": c.gets - c.illum_gets,
            "image_bytes_fetched": c.bytes_fetched - c.illum_bytes,
            "illum_gets": c.illum_gets,
            "illum_bytes_fetched": c.illum_bytes,
        }

    def concurrency_status(self) -> dict[str, Any]:
        """The limiter's snapshot; throttles/decreases/increases are cumulative since start."""
        return {**self.limiter.snapshot(), "adaptive": self.limiter.adaptive}

    def disk_status(self) -> list[dict[str, Any]]:
        return [tier.status() for tier in self.disk_tiers.values()]
