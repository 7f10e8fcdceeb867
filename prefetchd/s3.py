"""S3 client construction: endpoint resolution, unsigned access, timeouts and retries.

The endpoint is not part of a dataset string. Like every AWS tool we honour `AWS_ENDPOINT_URL_S3`,
then `AWS_ENDPOINT_URL`; the daemon config's `s3.endpoint_url` wins over both.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator

from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig


def resolve_endpoint(configured: str | None = None) -> str | None:
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def boto_config(s3: dict[str, Any], *, max_pool: int | None = None, retries: int | None = None) -> BotoConfig:
    """`retries=0`: one attempt per call, for a client whose caller retries itself (the GET client: `S3Store`
    retries every GET, so botocore's attempts and ours do not multiply)."""
    retries = int(s3.get("retries", 5)) if retries is None else retries
    return BotoConfig(
        signature_version=UNSIGNED if s3.get("unsigned", True) else None,
        region_name=s3.get("region") or "us-east-1",
        connect_timeout=float(s3.get("connect_timeout_s", 5.0)),
        read_timeout=float(s3.get("read_timeout_s", 30.0)),
        # Both modes retry throttling, 5xx and connection errors with jittered backoff; adaptive also rate-limits
        # the client when S3 answers 503 SlowDown and ramps back up as it recovers.
        retries={"mode": s3.get("retry_mode", "standard"), "total_max_attempts": retries + 1},
        max_pool_connections=max_pool or int(s3.get("max_concurrency", 32)),
        s3={"addressing_style": "path"} if resolve_endpoint(s3.get("endpoint_url")) else {},
        # The fetcher checks every body against its MD5 ETag already; a second (CRC) pass costs CPU only.
        response_checksum_validation="when_required",
    )


@contextlib.asynccontextmanager
async def make_s3_client(s3: dict[str, Any] | None = None, *, max_pool: int | None = None,
                         retries: int | None = None) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for the given `s3:` config block (see default_config.yaml)."""
    s3 = s3 or {}
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=resolve_endpoint(s3.get("endpoint_url")),
        config=boto_config(s3, max_pool=max_pool, retries=retries),
    ) as client:
        yield client
