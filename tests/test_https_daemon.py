"""The daemon over https, as against the real bucket: `rclone serve s3` behind a certificate from a CA made for
the test; the daemon trusts it through AWS_CA_BUNDLE and delivers exactly the source pixels (default GET
transport, `threads`: TLS on the GET threads); without the bundle it refuses the endpoint with the one-line fix."""

from __future__ import annotations

import shutil

import pytest

from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.errors import PrefetchdError

from test_faults import RAW, check_pixels

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone not installed (.[bench])")


@pytest.fixture(scope="module")
def https_s3(synthetic, tmp_path_factory):
    from bench.servers import S3Server

    workdir = tmp_path_factory.mktemp("https-daemon")
    shutil.copytree(synthetic.root, workdir / "data" / synthetic.bucket)   # rclone: a top-level folder is a bucket
    with S3Server("rclone", workdir, tls=True) as server:
        yield server


def test_the_daemon_reads_over_https_with_the_ca_from_aws_ca_bundle(daemon, synthetic, https_s3):
    d = daemon(endpoint_url=https_s3.endpoint_url, env={"AWS_CA_BUNDLE": str(https_s3.ca_file)})
    assert "GETs: threads" in d.log
    ids = []
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="https", cache_size=24, **RAW) as stream:
        for batch in stream.epoch(0):
            check_pixels(synthetic, batch)
            ids += batch.ids
    assert sorted(ids) == sorted(f.id for f in synthetic.manifest.fields)
    assert request("status", d.socket)["quarantined"] == 0


def test_without_the_ca_the_attach_fails_with_the_fix(daemon, synthetic, https_s3):
    d = daemon("index.wait_s=60", endpoint_url=https_s3.endpoint_url)
    with pytest.raises(PrefetchdError) as info:
        attach(synthetic.dataset, batch_size=4, socket=d.socket, job="no-ca", cache_size=24, **RAW)
    assert "AWS_CA_BUNDLE" in str(info.value) or "certificate" in str(info.value).lower(), str(info.value)
