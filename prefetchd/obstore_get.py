"""GETs through obstore (Rust `object_store`): the body never touches the event loop.

aiohttp reads a response on the event loop: ~11–18 ms of main-thread CPU per 5 × 2.5 MB field, which caps a
daemon at ~55–90 fields/s however many cores the node has (DESIGN.md, "One node at GPU rates"). obstore runs
the request, TLS and the body on its own Rust (tokio) threads without the GIL and hands back one `Bytes`
(buffer protocol, no copy) through a single future: `bench/ceiling.py` measures ~0.5 ms of main-thread CPU
per field.

What this module adds on top of obstore, so the fetcher behaves exactly as on the other transports:

- obstore's own retries are off (`max_retries: 0`): `S3Store` retries with jitter and must see every 503
  SlowDown, which lowers the adaptive GET limit (`concurrency.py`); obstore would retry it for minutes.
- Errors become what the other transports raise: a botocore `ClientError` built from the S3 XML error body
  for HTTP statuses (obstore has types for 403/404 only; 503, 500 and 301 are in the message text),
  `ConnectionRefusedError`, `socket.gaierror`, `TimeoutError`, `CertificateNotTrusted`, or `ConnectionError`
  for a body that broke, so `storage_errors.py` classifies them with the same one-line messages.
- The endpoint (`s3.endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`), `s3.region`,
  path-style addressing for custom endpoints (virtual-hosted for AWS, like botocore), `AWS_CA_BUNDLE` (obstore
  only reads `SSL_CERT_FILE`; the bundle is added to the trusted roots), `s3.connect_timeout_s`,
  `s3.read_timeout_s`. Proxies come from `HTTP(S)_PROXY` / `NO_PROXY` (reqwest reads them, as botocore does).
- Signed access (`s3.unsigned: false`) takes its credentials from botocore's chain (profiles, SSO, env,
  instance roles, …) through a credential provider, so it reads what aiobotocore would.

A store is built on the first GET, in the process that uses it: obstore's runtime is not fork-safe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import socket
from typing import Any

import obstore
from botocore.exceptions import NoCredentialsError
from obstore.store import S3Store as _ObstoreS3

from prefetchd.http_get import Fetched, client_error
from prefetchd.s3 import resolve_endpoint

# The overall request deadline obstore always applies (default 30 s) would fail a slow but moving body; a
# stalled one is caught by the read timeout, as with botocore, so the overall one is only a backstop.
REQUEST_DEADLINE = "1h"
CREDENTIAL_TTL = dt.timedelta(minutes=5)
REGION_LOOKUP_S = 10.0    # after a 301: how long HeadBucket may take to name the bucket's region    # obstore asks the provider again after this; botocore refreshes

_STATUS = re.compile(r"Server returned non-2xx status code: (\d{3})([^:\n]*): ?(.*?)(?:\n\nDebug source:|\Z)", re.S)
_DNS = re.compile(r'"dns error",\s*\w+\s*\{[^}]*?error:\s*"([^"]*)"', re.S)


class CertificateNotTrusted(Exception):
    """The endpoint's TLS certificate is not signed by a trusted CA: no retry changes that."""


def store_config(s3: dict[str, Any], bucket: str) -> dict[str, Any]:
    """Keyword arguments of `obstore.store.S3Store` for an `s3:` config block."""
    endpoint = resolve_endpoint(s3.get("endpoint_url"))
    unsigned = bool(s3.get("unsigned", True))
    config: dict[str, Any] = {"region": s3.get("region") or "us-east-1", "skip_signature": unsigned}
    if endpoint:
        config["endpoint"] = endpoint
    else:
        config["virtual_hosted_style_request"] = True   # what botocore does on AWS
    client: dict[str, Any] = {
        "connect_timeout": f"{float(s3.get('connect_timeout_s', 5.0)) * 1000:.0f}ms",
        "read_timeout": f"{float(s3.get('read_timeout_s', 30.0)) * 1000:.0f}ms",
        "timeout": REQUEST_DEADLINE,
        "allow_http": bool(endpoint) and endpoint.startswith("http://"),
        "pool_max_idle_per_host": str(int(s3.get("max_concurrency", 32))),
    }
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle:
        with open(bundle, "rb") as f:
            client["root_certificate"] = f.read()
    return {"bucket": bucket, "config": config, "client_options": client,
            "retry_config": {"max_retries": 0, "retry_timeout": dt.timedelta(0)},
            "credential_provider": None if unsigned else BotocoreCredentials()}


class BotocoreCredentials:
    """obstore credential provider backed by botocore's credential chain (the one aiobotocore reads)."""

    def __init__(self):
        import botocore.session

        self._credentials = botocore.session.get_session().get_credentials()

    def __call__(self) -> dict[str, Any]:
        if self._credentials is None:
            raise NoCredentialsError()
        frozen = self._credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": dt.datetime.now(dt.timezone.utc) + CREDENTIAL_TTL}


class ObstoreGetter:
    """GETs of one bucket's objects through obstore."""

    name = "obstore"

    def __init__(self, s3: dict[str, Any], bucket: str, client: Any = None):
        self.s3 = s3
        self.bucket = bucket
        self.client = client   # the botocore client: asked for the bucket's region after a 301
        self._store: _ObstoreS3 | None = None

    @property
    def store(self) -> _ObstoreS3:
        if self._store is None:
            kwargs = store_config(self.s3, self.bucket)
            provider = kwargs["credential_provider"]
            if provider is not None and provider._credentials is None:
                raise NoCredentialsError()
            self._store = _ObstoreS3(**kwargs)
        return self._store

    async def get(self, key: str) -> Fetched:
        try:
            result = await obstore.get_async(self.store, key)
            body = await result.bytes_async()
        except obstore.exceptions.BaseError as exc:
            raise await self._translate(exc) from None
        except FileNotFoundError as exc:     # obstore raises the builtin for 404
            raise await self._translate(exc) from None
        meta = result.meta
        return Fetched(body, int(meta["size"]), meta.get("e_tag"))

    async def _translate(self, exc: BaseException) -> BaseException:
        error = translate_error(exc)
        if getattr(error, "response", {}).get("Error", {}).get("Code") == "PermanentRedirect":
            region = await bucket_region(self.client, self.bucket)
            if region:
                error.response["Error"]["Region"] = region
        return error


def translate_error(exc: BaseException) -> BaseException:
    """The exception the aiohttp/botocore transports raise for the same failure (see module docstring)."""
    text = str(exc)
    headline = text.split("\n\nDebug source:")[0].strip()
    status = _STATUS.search(text)
    if status:
        return client_error(int(status.group(1)), status.group(3).strip().encode(), status.group(2).strip())
    if "redirect without LOCATION" in text:   # S3's answer from the wrong region's endpoint
        body = b"<Error><Code>PermanentRedirect</Code><Message>" + headline.encode() + b"</Message></Error>"
        return client_error(301, body, "Moved Permanently")
    if "ConnectionRefused" in text:
        return ConnectionRefusedError(f"connection refused: {headline}")
    dns = _DNS.search(text)
    if dns or '"dns error"' in text:
        return socket.gaierror(f"{dns.group(1) if dns else 'name resolution failed'}: {headline}")
    lowered = text.lower()
    if "invalid peer certificate" in lowered or "unknownissuer" in lowered or "certificate verify failed" in lowered:
        cause = re.search(r"invalid peer certificate: \w+", text)
        return CertificateNotTrusted(f"{headline}: {cause.group(0) if cause else 'certificate verify failed'}")
    if "kind: Timeout" in text or "TimedOut" in text or "timed out" in lowered:
        return TimeoutError(f"timed out: {headline}")
    return ConnectionError(f"{headline} ({_innermost(text)})")


def _innermost(text: str) -> str:
    """The deepest cause named in obstore's debug dump (e.g. ConnectionReset, IncompleteBody)."""
    found = re.findall(r"kind: (\w+)|error: (\w+),|message: \"([^\"]+)\"", text)
    names = [next(filter(None, groups)) for groups in found]
    return names[-1] if names else "error"


async def bucket_region(client: Any, bucket: str) -> str | None:
    """The region S3 names for a bucket (x-amz-bucket-region on HeadBucket, even when it answers 301)."""
    if client is None:
        return None
    try:
        response = await asyncio.wait_for(client.head_bucket(Bucket=bucket), REGION_LOOKUP_S)
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except Exception as exc:  # a 301 is a ClientError that still carries the header
        headers = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return headers.get("x-amz-bucket-region")
