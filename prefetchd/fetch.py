"""Object stores: bounded, retried, length- and MD5-checked reads from S3 (`get_transport.py`) or a local copy."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import logging
import random
from pathlib import Path
from typing import Any, Callable, Protocol

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
    SSLError as BotoSSLError,
)

from prefetchd.counters import FetchCounters
from prefetchd.errors import CorruptObjectError, ErrorCode, StorageError
from prefetchd.http_get import Fetched
from prefetchd.obstore_get import CertificateNotTrusted
from prefetchd.storage_errors import classify_storage_error

log = logging.getLogger(__name__)

# Errors worth another attempt: the connection or the body broke, not the request.
_TRANSIENT = (
    aiohttp.ClientError,
    http.client.HTTPException,
    asyncio.TimeoutError,
    OSError,
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
_PERMANENT_CODES = {"NoSuchKey", "404", "AccessDenied", "403", "NoSuchBucket", "InvalidObjectState",
                    "PermanentRedirect", "301"}
# S3 asking us to slow down: the concurrency limiter backs off before the retry.
THROTTLE_CODES = {"SlowDown", "503", "429", "TooManyRequests", "Throttling", "ThrottlingException",
                  "RequestLimitExceeded", "RequestThrottled"}


class TruncatedBody(Exception):
    pass


class BadChecksum(Exception):
    """The body's MD5 is not the object's ETag: bytes changed in flight."""


# An object's bytes: `bytes`, or a read-only buffer with the buffer protocol (obstore's `Bytes`), which decode,
# MD5 and the disk tier read in place.
Body = Any


class ObjectStore(Protocol):
    counters: FetchCounters

    async def get(self, key: str, expected_size: int = -1, expected_etag: str | None = None) -> Body: ...


def backoff_s(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff (AWS architecture blog): uniform in [0, min(cap, base·2^n)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))


class S3Store:
    """GETs from one bucket, at most as many at once as the shared limiter allows.

    The `getter` (`get_transport.py`: obstore by default, aiohttp or botocore) makes one attempt per call;
    this class owns everything around it, the same for every transport: retries with full-jitter backoff
    for throttling, 5xx, broken connections and bodies that break, come back short or fail their MD5;
    reporting throttles to the GET limiter; counters; one-line errors. Without a getter, GETs go through
    `client` itself (tools and tests; give it `retries=0`, or botocore's retries multiply with these).
    """

    def __init__(self, client: Any, bucket: str, semaphore: Any, counters: FetchCounters,
                 retries: int = 5, verify_md5: bool = True, getter: Any = None):
        self.client = client
        self.bucket = bucket
        self.semaphore = semaphore
        self.counters = counters
        self.retries = retries
        self.verify_md5 = verify_md5
        self.getter = getter if getter is not None else BotocoreGetter(client, bucket)

    async def get(self, key: str, expected_size: int = -1, expected_etag: str | None = None) -> Body:
        for attempt in range(self.retries + 1):
            try:
                return await self._get_once(key, expected_size, expected_etag)
            except Exception as exc:
                error = self._failed(key, exc, attempt, self.counters, self._throttled)
                if error is exc:
                    raise
                if error is not None:
                    raise error from exc
            await asyncio.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    def read_blocking(self, key: str, expected_size: int, expected_etag: str | None, sink: Callable, *,
                      counts: FetchCounters, on_throttle: Callable[[], None], abort: Any) -> Any:
        """`get` on a worker thread, for a transport that reads there (`getter.get_into`: the `threads` transport):
        the body goes through `sink` (`thread_get.Sink`) and what it returns comes back. The same retries,
        checks and errors as `get`; the counts go to `counts` (the caller adds them on the event loop) and
        throttles to `on_throttle` (thread-safe). The caller holds the GET limiter for it."""
        for attempt in range(self.retries + 1):
            try:
                counts.gets += 1
                fetched = self.getter.get_into(key, sink, md5=self.verify_md5, abort=abort)
                size = fetched.content_length
                if expected_size >= 0 and size != expected_size:
                    raise TruncatedBody(f"got {size} bytes, expected {expected_size}")
                if self.verify_md5:
                    _check_digest(fetched.md5, expected_etag or fetched.etag)
                counts.bytes_fetched += size
                return fetched.data
            except Exception as exc:
                error = self._failed(key, exc, attempt, counts, on_throttle)
                if error is exc:
                    raise
                if error is not None:
                    raise error from exc
            if abort.event.wait(backoff_s(attempt)):
                abort.check()
        raise AssertionError("unreachable")

    def _throttled(self) -> None:
        _limiter_call(self.semaphore, "on_throttle")

    def _failed(self, key: str, exc: Exception, attempt: int, counts: FetchCounters,
                on_throttle: Callable[[], None]) -> Exception | None:
        """What a failed attempt means: the one-line error to raise, None to try again (counted as a retry), or
        `exc` itself when it is no storage failure (re-raised as it is)."""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in THROTTLE_CODES:
                on_throttle()
            if code in _PERMANENT_CODES or attempt == self.retries:
                counts.errors += 1
                return self._object_error(key, exc)
        elif isinstance(exc, (aiohttp.ClientConnectorCertificateError, CertificateNotTrusted, BotoSSLError)):
            counts.errors += 1                 # no retry makes a certificate trusted
            return StorageError(f"s3://{self.bucket}/{key}: TLS certificate not trusted ({exc}); for a private "
                                "CA or a TLS-inspecting proxy set AWS_CA_BUNDLE to its CA bundle", code=ErrorCode.TLS)
        elif isinstance(exc, NoCredentialsError):
            counts.errors += 1
            return CorruptObjectError(f"s3://{self.bucket}/{key}: {self._reason(exc).message}",
                                      code=ErrorCode.ACCESS_DENIED)
        elif isinstance(exc, (*_TRANSIENT, TruncatedBody, BadChecksum, BotoCoreError)):
            if attempt == self.retries:
                counts.errors += 1
                if isinstance(exc, (TruncatedBody, BadChecksum)):
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    reason = self._reason(exc).message
                return CorruptObjectError(f"s3://{self.bucket}/{key}: {reason} after {attempt + 1} attempts",
                                          code=ErrorCode.STORAGE)
            log.debug("retrying %s after %s", key, exc)
        else:
            return exc
        counts.retries += 1
        return None

    def _reason(self, exc: BaseException):
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return classify_storage_error(exc, endpoint, self.bucket)

    def _object_error(self, key: str, exc: ClientError) -> CorruptObjectError:
        reason = self._reason(exc)
        return CorruptObjectError(f"s3://{self.bucket}/{key}: {reason.message}", code=reason.code)

    async def _get_once(self, key: str, expected_size: int, expected_etag: str | None = None) -> Body:
        async with self.semaphore:
            self.counters.inflight += 1
            self.counters.count_get()
            try:
                fetched = await self.getter.get(key)
            finally:
                self.counters.inflight -= 1
        data, announced = fetched.data, fetched.content_length
        size = len(data)
        if (announced >= 0 and size != announced) or (expected_size >= 0 and size != expected_size):
            raise TruncatedBody(f"got {size} bytes, expected {expected_size if expected_size >= 0 else announced}")
        if self.verify_md5 and fetched.md5 is not None:     # hashed while it was read
            _check_digest(fetched.md5, expected_etag or fetched.etag)
        elif self.verify_md5:
            # hashlib releases the GIL on large inputs: 12.8 MB per field is ~15 ms of CPU, off the loop.
            await asyncio.to_thread(_check_md5, data, expected_etag or fetched.etag)
        _limiter_call(self.semaphore, "on_success", size)
        self.counters.add_bytes(size)
        return data


class BotocoreGetter:
    """GETs through an aiobotocore client (signed or unsigned); the body is read on the event loop."""

    name = "botocore"

    def __init__(self, client: Any, bucket: str):
        self.client = client
        self.bucket = bucket

    async def get(self, key: str) -> Fetched:
        response = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            data = await body.read()
        return Fetched(data, response.get("ContentLength", -1), response.get("ETag"))


def _limiter_call(limiter: Any, method: str, *args) -> None:
    """The shared limiter adapts to throughput and throttling; a plain semaphore (tools, tests) does not."""
    fn = getattr(limiter, method, None)
    if fn is not None:
        fn(*args)


def _check_md5(data: bytes, etag: str | None) -> None:
    """A single-part upload's ETag is the MD5 of its bytes; objects uploaded without flexible checksums
    (the public JUMP bucket) have nothing else that would catch same-length corruption. Multipart and
    SSE-KMS ETags are not MD5s and are skipped."""
    if _is_md5(etag):
        _check_digest(hashlib.md5(data).hexdigest(), etag)


def _is_md5(etag: str | None) -> bool:
    etag = (etag or "").strip('"')
    return len(etag) == 32 and "-" not in etag


def _check_digest(digest: str | None, etag: str | None) -> None:
    """`digest` (hex MD5 of the body) against a single-part ETag; other ETags are not MD5s and are skipped."""
    if not _is_md5(etag) or digest is None:
        return
    etag = (etag or "").strip('"')
    if digest != etag.lower():
        raise BadChecksum(f"MD5 {digest} != ETag {etag}")


class LocalStore:
    """Reads from a local copy of the bucket layout (`JUMPLocal:root=...`), keys relative to root."""

    def __init__(self, root: str | Path, semaphore: asyncio.Semaphore, counters: FetchCounters):
        self.root = Path(root)
        self.semaphore = semaphore
        self.counters = counters

    async def get(self, key: str, expected_size: int = -1, expected_etag: str | None = None) -> bytes:
        path = self.root / key
        async with self.semaphore:
            self.counters.inflight += 1
            self.counters.count_get()
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError as exc:
                self.counters.errors += 1
                raise CorruptObjectError(f"{path}: file not found") from exc
            except OSError as exc:
                self.counters.errors += 1
                raise StorageError(f"{path}: {exc.strerror}") from exc
            finally:
                self.counters.inflight -= 1
        if expected_size >= 0 and len(data) != expected_size:
            raise CorruptObjectError(f"{path}: {len(data)} bytes, expected {expected_size}")
        self.counters.add_bytes(len(data))
        return data
