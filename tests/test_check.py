"""`prefetchd check`: one line per step, against moto's real S3 API on loopback."""

from __future__ import annotations

import types

import pytest

from prefetchd.check import cli_check, run_checks
from prefetchd.config import Config
from prefetchd.dataset import parse_dataset

from conftest import free_port

PREFIX = "cpg0000-jump-pilot/source_4/images"
KEY = (f"{PREFIX}/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/Images/"
       "r01c01f01p01-ch{ch}sk1fk1fl1.tiff")
TIFF = b"II*\x00" + bytes(60)


def put(s3, bucket: str, keys: list[str], *, public: bool = True) -> str:
    (s3.create_public_bucket if public else s3.create_private_bucket)(bucket)
    client = s3.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=TIFF)
    return bucket


@pytest.fixture(scope="module")
def public_bucket(s3) -> str:
    return put(s3, "check-public", [KEY.format(ch=ch) for ch in range(1, 6)])


@pytest.fixture
def s3cfg(s3) -> dict:
    return {"endpoint_url": s3.endpoint_url, "unsigned": True, "retries": 3, "connect_timeout_s": 2.0}


def spec(bucket: str, prefix: str = PREFIX):
    return parse_dataset(f"JUMPS3MultiView:bucket={bucket}:prefix={prefix}")



def names_and_status(results) -> list[tuple[str, bool]]:
    return [(r.name, r.ok) for r in results]


async def test_all_checks_pass(public_bucket, s3cfg):
    results = await run_checks(spec(public_bucket), s3cfg)
    assert names_and_status(results) == [(n, True) for n in ("endpoint", "DNS", "TCP connect", "bucket",
                                                             "prefix", "GET")]
    assert s3cfg["endpoint_url"] in results[0].line() and "s3.endpoint_url" in results[0].line()
    assert all(r.line().startswith("OK") for r in results)


async def test_endpoint_from_environment(public_bucket, s3cfg, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3cfg["endpoint_url"])
    results = await run_checks(spec(public_bucket), {**s3cfg, "endpoint_url": None})
    assert "$AWS_ENDPOINT_URL_S3" in results[0].detail and all(r.ok for r in results)


async def test_dns_failure(s3cfg):
    results = await run_checks(spec("x"), {**s3cfg, "endpoint_url": "http://nonexistent.invalid:9000"})
    assert names_and_status(results)[-1] == ("DNS", False)
    assert "nonexistent.invalid" in results[-1].line() and "AWS_ENDPOINT_URL_S3" in results[-1].line()


async def test_endpoint_down(s3cfg):
    results = await run_checks(spec("x"), {**s3cfg, "endpoint_url": f"http://127.0.0.1:{free_port()}"})
    assert names_and_status(results)[-1] == ("TCP connect", False)
    assert "endpoint is down" in results[-1].line()


async def test_no_such_bucket(s3cfg):
    results = await run_checks(spec("check-missing-bucket"), s3cfg)
    assert names_and_status(results)[-1] == ("bucket", False) and "NoSuchBucket" in results[-1].line()


async def test_empty_prefix(public_bucket, s3cfg):
    results = await run_checks(spec(public_bucket, "cpg0000-jump-pilot/elsewhere"), s3cfg)
    assert names_and_status(results)[-1] == ("prefix", False)
    assert "no objects under s3://check-public/cpg0000-jump-pilot/elsewhere/" in results[-1].line()


async def test_prefix_outside_the_layout(s3, s3cfg):
    put(s3, "check-junk", ["data/a.txt", "data/b.csv"])
    results = await run_checks(spec("check-junk", "data"), s3cfg)
    assert names_and_status(results)[-1] == ("prefix", False) and "data/a.txt" in results[-1].line()


async def test_private_bucket_gives_403_with_the_fix(s3, s3cfg):
    put(s3, "check-private", [KEY.format(ch=1)], public=False)
    results = await run_checks(spec("check-private"), s3cfg)
    assert names_and_status(results)[-1] == ("GET", False)
    assert "403" in results[-1].line() and "s3.unsigned=false" in results[-1].line()


async def test_local_root(tmp_path):
    path = tmp_path / "sync" / KEY.format(ch=1)
    path.parent.mkdir(parents=True)
    path.write_bytes(TIFF)
    results = await run_checks(parse_dataset(f"JUMPLocal:root={tmp_path / 'sync' / PREFIX}"), {})
    assert names_and_status(results) == [("root", True), ("readable", True), ("layout", True)]
    missing = await run_checks(parse_dataset(f"JUMPLocal:root={tmp_path / 'nope'}"), {})
    assert names_and_status(missing) == [("root", False)] and "fix root=" in missing[0].line()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    unmatched = await run_checks(parse_dataset(f"JUMPLocal:root={tmp_path / 'other'}"), {})
    assert names_and_status(unmatched)[-1] == ("layout", False) and "x.txt" in unmatched[-1].line()


def test_cli_exit_codes(public_bucket, s3, capsys):
    config = Config.load()
    ok = types.SimpleNamespace(dataset=spec(public_bucket).text, endpoint_url=s3.endpoint_url)
    assert cli_check(ok, config) == 0
    assert capsys.readouterr().out.count("OK") == 6
    bad = types.SimpleNamespace(dataset=spec("check-missing-bucket").text, endpoint_url=s3.endpoint_url)
    assert cli_check(bad, config) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL bucket")
