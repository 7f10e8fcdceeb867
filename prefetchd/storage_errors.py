"""Turn an exception from the object store (botocore, aiohttp, OS) into one line that says what to change.

Used by the index builder, `prefetchd check` and the fetcher, so the same failure reads the same everywhere.
"""

from __future__ import annotations

import socket
from typing import Iterator
from urllib.parse import urlparse

from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from prefetchd.errors import ErrorCode, PrefetchdError, StorageError

ENDPOINT_SETTINGS = "s3.endpoint_url (or AWS_ENDPOINT_URL_S3)"
_ACCESS_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_NO_BUCKET = {"NoSuchBucket"}
_DNS_TEXT = ("name or service not known", "nodename nor servname", "temporary failure in name resolution",
             "no address associated", "name resolution", "getaddrinfo failed")


def describe_endpoint(endpoint: str | None) -> str:
    return endpoint or "the default AWS S3 endpoint"


def endpoint_host(endpoint: str | None, region: str = "us-east-1") -> str:
    return (urlparse(endpoint).hostname or endpoint) if endpoint else f"s3.{region}.amazonaws.com"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc, its wrapped `error=` (botocore), `os_error` (aiohttp), __cause__ and __context__, deduplicated."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "kwargs", {}).get("error") if hasattr(current, "kwargs") else None
        stack.extend(c for c in (wrapped, getattr(current, "os_error", None),
                                 current.__cause__, current.__context__) if isinstance(c, BaseException))


def _is_dns_failure(exc: BaseException) -> bool:
    return any(isinstance(c, socket.gaierror) or type(c).__name__ == "ClientConnectorDNSError"
               or any(text in str(c).lower() for text in _DNS_TEXT) for c in _causes(exc))


def _is_refused(exc: BaseException) -> bool:
    return any(isinstance(c, ConnectionRefusedError) or "connection refused" in str(c).lower()
               or "connect call failed" in str(c).lower() for c in _causes(exc))


def _client_error(exc: ClientError, endpoint: str | None, bucket: str | None) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    where = f"s3://{bucket}" if bucket else "the bucket"
    at = describe_endpoint(endpoint)
    if code in _NO_BUCKET or (status == 404 and exc.operation_name == "HeadBucket"):
        return StorageError(f"bucket {bucket!r} does not exist at {at} (NoSuchBucket): fix bucket= in the "
                            f"dataset string, or {ENDPOINT_SETTINGS} if it lives on another endpoint",
                            code=ErrorCode.NO_SUCH_BUCKET)
    if code in ("PermanentRedirect", "301") or status == 301:
        region = error.get("Region") or "the bucket's region"
        return StorageError(f"{where} is not in s3.region at {at} ({code or status}): set s3.region={region}",
                            code=ErrorCode.WRONG_REGION)
    if code in _BAD_CREDENTIALS:
        return StorageError(f"{at} rejected the credentials for {where} ({code}): fix AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY/AWS_PROFILE, or set s3.unsigned=true for a public bucket",
                            code=ErrorCode.ACCESS_DENIED)
    if code in _ACCESS_DENIED or status == 403:
        return StorageError(f"access denied to {where} at {at} (403 {code or 'Forbidden'}): the bucket is not "
                            "public or needs credentials; set s3.unsigned=false and provide AWS credentials "
                            "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)", code=ErrorCode.ACCESS_DENIED)
    message = error.get("Message") or code or f"HTTP {status}"
    return StorageError(f"{at} answered {code or status} for {where}: {message}", code=ErrorCode.STORAGE)


def classify_storage_error(exc: BaseException, endpoint: str | None, bucket: str | None = None,
                           *, region: str = "us-east-1") -> PrefetchdError:
    """The user-facing error for an exception raised while talking to the object store."""
    if isinstance(exc, PrefetchdError):
        return exc
    if isinstance(exc, ClientError):
        return _client_error(exc, endpoint, bucket)
    at = describe_endpoint(endpoint)
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no AWS credentials found for {at}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY, or s3.unsigned=true for a public bucket", code=ErrorCode.ACCESS_DENIED)
    if _is_dns_failure(exc):
        return StorageError(f"cannot resolve host {endpoint_host(endpoint, region)!r} of endpoint {at}: fix "
                            f"{ENDPOINT_SETTINGS} or the network's DNS", code=ErrorCode.DNS)
    if _is_refused(exc):
        return StorageError(f"connection refused by {at}: the endpoint is down or the URL is wrong; start it "
                            f"or fix {ENDPOINT_SETTINGS}", code=ErrorCode.CONNECTION_REFUSED)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        return StorageError(f"{at} timed out: check the network or raise s3.connect_timeout_s/"
                            "s3.read_timeout_s", code=ErrorCode.TIMEOUT)
    if isinstance(exc, (EndpointConnectionError, OSError)):
        return StorageError(f"cannot connect to {at}: {exc}; check {ENDPOINT_SETTINGS} and the network",
                            code=ErrorCode.STORAGE)
    return StorageError(f"object store error at {at}: {type(exc).__name__}: {exc}", code=ErrorCode.STORAGE)
