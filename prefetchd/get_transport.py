"""Which library performs the daemon's object GETs (`s3.get_transport`), made once per daemon.

    async with make_get_transport(s3) as transport:
        store = S3Store(client, bucket, limiter, counters, getter=transport.getter(client, bucket))

- `threads` (what `auto` picks for unsigned access, the default): blocking GETs on a pool of threads, each
  body received straight into its slot or a reused buffer (`thread_get.py`, `receive.py`); the event loop hands
  a whole field to a thread. `python -m bench.ceiling` measures it against the others.
- `obstore` (what `auto` picks for signed access): Rust object_store; request, TLS and body on native threads,
  off the event loop (`obstore_get.py`).
- `aiohttp`: unsigned GETs straight to the object URL on the event loop (`http_get.py`); signed access
  falls back to botocore, since it sends no signatures.
- `botocore`: every GET through aiobotocore (on the event loop, ~2 ms of CPU per request more).

Every getter does one attempt per call and raises what botocore would (`ClientError` for S3 errors); the
retries, their jitter, the throttle feedback to the GET limiter and the body checks are `S3Store`'s, the
same for all three. The botocore transport therefore gets its own client with botocore's retries off:
the LIST client keeps them, and a GET is never retried by both layers (issue #16).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from prefetchd.errors import ConfigError

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "threads", "obstore", "aiohttp", "botocore")
POOL_THREADS = 512        # upper bound of the `threads` pools (threads start when needed; the GET limiter bounds them)


def resolve_transport(s3: dict[str, Any]) -> str:
    """The transport an `s3:` block asks for, after `auto` and the unsigned-only aiohttp path are resolved."""
    setting = s3.get("get_transport", "auto")
    if setting not in TRANSPORTS:
        raise ConfigError(f"s3.get_transport must be one of {', '.join(TRANSPORTS)}, got {setting!r}")
    unsigned = s3.get("unsigned", True)
    if setting == "auto":
        return "threads" if unsigned else "obstore"
    if setting == "threads" and not unsigned:
        return "obstore"       # it does not sign
    if setting == "aiohttp" and not unsigned:
        return "botocore"
    return setting


@dataclass
class GetTransport:
    s3: dict[str, Any]
    name: str
    http: Any = None          # aiohttp session (aiohttp)
    get_client: Any = None    # aiobotocore client without retries (botocore)
    pool: Any = None          # threads: the GETs (one per channel)
    field_pool: Any = None    # threads: one task per field, which hands its channels to `pool`
    _getters: dict = field(default_factory=dict)   # bucket -> getter: jobs on one bucket share its connections

    def getter(self, client: Any, bucket: str):
        """A getter for `bucket`; `client` is the daemon's botocore client (URLs, a 301's region)."""
        log.debug("GETs from bucket %s through %s", bucket, self.name)
        if self.name == "threads":
            from prefetchd.thread_get import ThreadGetter

            if bucket not in self._getters:
                self._getters[bucket] = ThreadGetter(self.s3, bucket, client, self.pool, self.field_pool)
            return self._getters[bucket]
        if self.name == "obstore":
            from prefetchd.obstore_get import ObstoreGetter

            if bucket not in self._getters:
                self._getters[bucket] = ObstoreGetter(self.s3, bucket, client)
            return self._getters[bucket]
        if self.name == "aiohttp":
            from prefetchd.http_get import HttpGetter

            return HttpGetter(self.http, client, bucket)
        from prefetchd.fetch import BotocoreGetter

        return BotocoreGetter(self.get_client, bucket)


@contextlib.asynccontextmanager
async def make_get_transport(s3: dict[str, Any]) -> AsyncIterator[GetTransport]:
    name = resolve_transport(s3)
    async with contextlib.AsyncExitStack() as stack:
        transport = GetTransport(s3, name)
        if name == "threads":
            from concurrent.futures import ThreadPoolExecutor

            transport.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="get")
            transport.field_pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="fill")
            stack.callback(transport.field_pool.shutdown, wait=False, cancel_futures=True)
            stack.callback(transport.pool.shutdown, wait=False, cancel_futures=True)
            stack.callback(lambda: [g.close() for g in transport._getters.values()])
        elif name == "aiohttp":
            from prefetchd.http_get import make_http_session

            transport.http = await stack.enter_async_context(make_http_session(s3))
        elif name == "botocore":
            from prefetchd.s3 import make_s3_client

            transport.get_client = await stack.enter_async_context(make_s3_client(s3, retries=0))
        yield transport
