"""Unsigned GETs straight over aiohttp, for public buckets such as `cellpainting-gallery`.

An anonymous GetObject is a plain HTTP GET of the object's URL. Going through botocore costs ~2 ms of CPU per
request on top of the transfer (request/response model, handlers, header parsing; `bench/get_overhead.py`
measures it), which at five GETs per field is a quarter of the daemon's CPU. So for unsigned access the
fetcher asks botocore once per bucket for the object URL (its own endpoint resolution: region, addressing
style, custom endpoint) and then GETs with aiohttp. Signed access keeps using botocore for every request.

Errors come back as botocore `ClientError`s built from the S3 XML error body, so classification, retries and
quarantine are the same for both transports.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import quote

import aiohttp
from aiohttp.helpers import BasicAuth, get_env_proxy_for_url
from botocore.exceptions import ClientError
from botocore.httpsession import get_cert_path
from yarl import URL

from prefetchd.errors import StorageError

SENTINEL = "__prefetchd_key__"
READ_BUFSIZE = 1 << 20   # one 1 MiB buffer per response instead of 64 KiB: fewer pause/resume cycles per body
_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


@dataclass
class Fetched:
    data: bytes
    content_length: int
    etag: str | None
    md5: str | None = None    # hex digest of the body, when the transport hashed it while reading


@contextlib.asynccontextmanager
async def make_http_session(s3: dict[str, Any]) -> AsyncIterator[aiohttp.ClientSession]:
    """A connection pool for direct GETs with the `s3:` block's timeouts (proxies: see `HttpGetter`)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=float(s3.get("connect_timeout_s", 5.0)),
                                    sock_read=float(s3.get("read_timeout_s", 30.0)))
    # limit=0: the daemon's GET limiter (concurrency.py) bounds requests; a reload may raise it
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, ssl=ssl_context())
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     read_bufsize=READ_BUFSIZE, skip_auto_headers=("Accept-Encoding",)) as session:
        yield session


def ssl_context() -> ssl.SSLContext:
    """The CA bundle botocore would use: AWS_CA_BUNDLE (TLS-inspecting proxies), else botocore's default."""
    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))


async def object_url_template(client: Any, bucket: str) -> tuple[str, str]:
    """(prefix, suffix) such that prefix + quote(key) + suffix is the URL botocore would GET for the key."""
    url = await client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": SENTINEL})
    prefix, found, suffix = url.partition(SENTINEL)
    if not found or "?" in prefix:
        raise StorageError(f"cannot derive a plain object URL for bucket {bucket!r} from {url!r}: set "
                           "s3.get_transport=botocore")
    return prefix, suffix


def quote_key(key: str) -> str:
    """Percent-encoding as botocore does it for object keys (keeps `/` and `~`)."""
    return quote(key, safe="/~")


def client_error(status: int, body: bytes, reason: str, headers: Any = None) -> ClientError:
    """The ClientError botocore would raise; S3 names a bucket's region in a header (301 from a wrong region)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    error = {
        "Code": code.group(1).decode(errors="replace") if code else str(status),
        "Message": message.group(1).decode(errors="replace") if message else reason,
    }
    region = (headers or {}).get("x-amz-bucket-region")
    if region:
        error["Region"] = region
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def proxy_for(url: URL) -> tuple[URL | None, BasicAuth | None]:
    """HTTP(S)_PROXY / NO_PROXY for the bucket's host, as botocore honours them; looked up once per bucket
    (aiohttp's trust_env would parse the environment on every request)."""
    try:
        return get_env_proxy_for_url(url)
    except LookupError:
        return None, None


class HttpGetter:
    """GETs of one bucket's objects over a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, client: Any, bucket: str):
        self.session = session
        self.client = client
        self.bucket = bucket
        self._template: tuple[str, str] | None = None
        self._proxy: tuple[URL | None, BasicAuth | None] = (None, None)

    async def url(self, key: str) -> URL:
        if self._template is None:
            self._template = await object_url_template(self.client, self.bucket)
            self._proxy = proxy_for(URL(self._template[0]))
        prefix, suffix = self._template
        return URL(prefix + quote_key(key) + suffix, encoded=True)

    async def get(self, key: str) -> Fetched:
        url = await self.url(key)
        proxy, proxy_auth = self._proxy
        async with self.session.get(url, proxy=proxy, proxy_auth=proxy_auth) as response:
            body = await response.read()
            if response.status != 200:
                raise client_error(response.status, body, response.reason or "", response.headers)
            return Fetched(body, response.content_length if response.content_length is not None else -1,
                           response.headers.get("ETag"))
