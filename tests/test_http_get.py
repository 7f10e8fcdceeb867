"""Unsigned GETs over aiohttp (prefetchd/http_get.py) against moto's S3 server: the same bytes, URLs and
errors as the botocore transport they replace for public buckets."""

from __future__ import annotations

import asyncio
import json

import pytest

from prefetchd.counters import FetchCounters
from prefetchd.errors import CorruptObjectError
from prefetchd.fetch import S3Store
from prefetchd.http_get import make_http_session, object_url_template, quote_key
from prefetchd.dev.locals3 import admin_client, public_read_policy
from prefetchd.s3 import make_s3_client

KEYS = ["plain.tiff", "source_3/Measurement 1/r01c01f01p01-ch1sk1fk1fl1.tiff", "a+b/c%d~e&f=g?.tiff", "ünï/ß.tiff"]


@pytest.fixture(scope="module")
def buckets(s3):
    admin = admin_client(s3.endpoint_url)
    for bucket in ("httpget-pub", "httpget-priv"):
        admin.create_bucket(Bucket=bucket)
    admin.put_bucket_policy(Bucket="httpget-pub", Policy=json.dumps(public_read_policy("httpget-pub")))
    for i, key in enumerate(KEYS):
        admin.put_object(Bucket="httpget-pub", Key=key, Body=bytes([i]) * (1000 + i))
    admin.put_object(Bucket="httpget-priv", Key="k.tiff", Body=b"x")
    return s3.endpoint_url


async def _outcomes(endpoint: str, http_transport: bool) -> list:
    cfg = {"endpoint_url": endpoint}
    async with make_s3_client(cfg) as client, make_http_session(cfg) as http:
        out = []
        for bucket, key in [("httpget-pub", k) for k in KEYS] + [
                ("httpget-pub", "missing.tiff"), ("httpget-priv", "k.tiff"), ("httpget-nobucket", "k.tiff")]:
            store = S3Store(client, bucket, asyncio.Semaphore(4), FetchCounters(), retries=1,
                            http=http if http_transport else None)
            try:
                out.append(await store.get(key))
            except CorruptObjectError as exc:
                out.append((exc.code, str(exc)))
        return out


def test_both_transports_return_the_same_bytes_and_the_same_errors(buckets):
    direct = asyncio.run(_outcomes(buckets, http_transport=True))
    botocore = asyncio.run(_outcomes(buckets, http_transport=False))
    assert direct == botocore
    assert direct[: len(KEYS)] == [bytes([i]) * (1000 + i) for i in range(len(KEYS))]
    assert [o[0] for o in direct[len(KEYS):]] == ["storage", "access_denied", "no_such_bucket"]


def test_object_urls_are_the_ones_botocore_uses():
    async def urls(endpoint):
        async with make_s3_client({"endpoint_url": endpoint}) as client:
            prefix, suffix = await object_url_template(client, "cellpainting-gallery")
            key = "cpg0016-jump/source_3/images/Measurement 1/x+y.tiff"
            expected = await client.generate_presigned_url(
                "get_object", Params={"Bucket": "cellpainting-gallery", "Key": key})
            return prefix + quote_key(key) + suffix, expected

    for endpoint in (None, "http://127.0.0.1:9"):    # AWS (virtual-hosted) and a local mirror (path style)
        built, expected = asyncio.run(urls(endpoint))
        assert built == expected
    assert asyncio.run(urls(None))[0].startswith("https://cellpainting-gallery.s3.amazonaws.com/cpg0016-jump/")


def test_the_proxy_comes_from_the_environment_like_botocore(monkeypatch):
    from yarl import URL

    from prefetchd.http_get import proxy_for

    bucket_url = URL("https://cellpainting-gallery.s3.amazonaws.com/")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxy, auth = proxy_for(bucket_url)
    assert (str(proxy), auth.login) == ("http://proxy.internal:3128", "user")
    monkeypatch.setenv("NO_PROXY", ".amazonaws.com")
    assert proxy_for(bucket_url) == (None, None)


def test_a_bucket_in_another_region_is_one_clear_error_not_retries(buckets):
    """S3 answers a wrong-region request with 301 PermanentRedirect and the bucket's region in a header:
    no retry helps, the message names the setting (both transports)."""
    from faultproxy import FaultProxy

    async def get(endpoint, http_transport):
        cfg = {"endpoint_url": endpoint}
        async with make_s3_client(cfg) as client, make_http_session(cfg) as http:
            store = S3Store(client, "httpget-pub", asyncio.Semaphore(4), FetchCounters(), retries=3,
                            http=http if http_transport else None)
            with pytest.raises(CorruptObjectError) as info:
                await store.get(KEYS[0])
            return info.value, store.counters.retries

    with FaultProxy(upstream=buckets, seed=1) as proxy:
        proxy.add_rule("301")
        for http_transport in (True, False):
            error, retries = asyncio.run(get(proxy.url, http_transport))
            assert retries == 0, http_transport
            assert error.code == "wrong_region" and "set s3.region=" in error.message, error.message
        assert "s3.region=eu-west-1" in asyncio.run(get(proxy.url, True))[0].message
