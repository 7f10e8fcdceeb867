"""Does the S3 endpoint answer at all? One small LIST, not retried, before a job is started.

An endpoint that accepts connections and never answers (a wrong port, a hung proxy, something that is not an
S3 server) would otherwise hold an attach for (retries + 1) × read timeout per request of the index build and
of the first fills, minutes with nothing in the log. One unretried LIST bounded by the connect and read
timeouts tells it apart from every other failure, which the index build reports with its own message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prefetchd.dataset import DatasetSpec
from prefetchd.errors import ErrorCode, StorageError
from prefetchd.s3 import make_s3_client, resolve_endpoint

log = logging.getLogger("prefetchd")


async def check_endpoint_answers(spec: DatasetSpec, s3cfg: dict[str, Any]) -> None:
    """Raise a one-line `StorageError` (code timeout) if the dataset's S3 endpoint does not answer one LIST
    within s3.connect_timeout_s + s3.read_timeout_s; any answer, even an error, passes."""
    if spec.bucket is None:
        return  # a local directory
    bound = float(s3cfg.get("connect_timeout_s", 5.0)) + float(s3cfg.get("read_timeout_s", 30.0))
    endpoint = resolve_endpoint(s3cfg.get("endpoint_url")) or "AWS S3"
    try:
        async with make_s3_client(s3cfg, max_pool=1, retries=0) as client:
            await asyncio.wait_for(client.list_objects_v2(Bucket=spec.bucket, Prefix=spec.prefixes[0], MaxKeys=1),
                                   bound)
    except asyncio.TimeoutError:
        pass
    except Exception as exc:  # answered (an error), or failed fast: the index build reports it properly
        if "timeout" not in type(exc).__name__.lower():
            return
    else:
        return
    message = (f"the S3 endpoint {endpoint} did not answer a LIST of s3://{spec.bucket}/{spec.prefixes[0]} within "
               f"{bound:g} s (s3.connect_timeout_s + s3.read_timeout_s): it is unreachable, hung, or not an S3 "
               "server; check s3.endpoint_url (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and the network")
    log.warning("%s", message)
    raise StorageError(message, code=ErrorCode.TIMEOUT)
