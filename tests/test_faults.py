"""Faults from S3, injected by a real TCP proxy (tests/faultproxy.py) in front of moto.

Transient faults are retried and the pixels that arrive are exactly the source TIFFs; objects that stay
bad are quarantined (status, log line) and replaced by a substitute so batches keep their size; corrupt
bytes are never delivered.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request

from conftest import wait_until
from faultproxy import FaultProxy

RAW = {"illum": False, "clahe": False, "rescale": False}
# Read timeout well under the injected 5 s stall, but not so short that a loaded CI machine trips it.
FAST = ("s3.read_timeout_s=2.5", "s3.connect_timeout_s=2", "s3.retries=3")


@pytest.fixture
def proxy(s3):
    with FaultProxy(upstream=s3.endpoint_url, seed=1) as p:
        yield p


def check_pixels(synthetic, batch) -> None:
    """Every delivered channel equals the source TIFF, bit for bit."""
    for i, field_id in enumerate(batch.ids):
        f = synthetic.manifest.field_by_id(field_id)
        for c, channel in enumerate(DEFAULT_CHANNELS):
            source = tifffile.imread(synthetic.root / f.keys[PHENIX_CHANNELS[channel]])
            np.testing.assert_array_equal(batch.images[i, c], source, err_msg=f"{field_id} {channel}: garbage delivered")


def read_epoch(synthetic, d, job: str, epoch: int = 0, statuses: list | None = None) -> list[str]:
    statuses = [] if statuses is None else statuses
    ids = []
    # Job ids name /dev/shm segments machine-wide: another test session's daemon may hold the same name.
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=f"{job}-{os.getpid()}", cache_size=24,
                **RAW) as stream:
        for batch in stream.epoch(epoch):
            assert len(batch.ids) == 4
            check_pixels(synthetic, batch)
            ids += batch.ids
        statuses.append(stream.status())  # while attached: the job's own entry is still listed
    return ids


def test_transient_faults_are_retried_and_pixels_are_exact(daemon, synthetic, proxy):
    d = daemon(*FAST, endpoint_url=proxy.url)
    for mode, n in (("503", 3), ("500", 2), ("reset", 2), ("truncate", 2), ("stall", 1)):
        proxy.add_rule(mode, first_n=n, stall_s=5)
    ids = read_epoch(synthetic, d, "transient")
    assert sorted(ids) == sorted(f.id for f in synthetic.manifest.fields)
    fired = {mode: len(proxy.faults(mode)) for mode in ("503", "500", "reset", "truncate", "stall")}
    assert fired == {"503": 3, "500": 2, "reset": 2, "truncate": 2, "stall": 1}
    status = request("status", d.socket)
    assert status["quarantined"] == 0
    object_gets = [r for r in proxy.log if r.method == "GET" and ".tiff" in r.path]
    # every faulted GET was retried until a clean copy of the same object came through
    for i, record in enumerate(object_gets):
        if record.fault:
            assert any(later.path == record.path and not later.fault for later in object_gets[i + 1:]), record
    # Each fault cost one more GET of that object, never a refetch of the whole field: every GET beyond the
    # first of an object is a retry the daemon counted. A loaded machine may add a read-timeout retry of its
    # own (s3.read_timeout_s is short so the stall test stays fast), hence >= and not ==.
    assert len(object_gets) == 5 * 24 + status["retries"]
    assert status["retries"] >= sum(fired.values())


def test_objects_that_stay_bad_are_quarantined_and_substituted(daemon, synthetic, proxy):
    d = daemon(*FAST, endpoint_url=proxy.url)
    fields = synthetic.manifest.fields
    missing, denied = fields[5], fields[11]
    proxy.add_rule("404", match=missing.keys[PHENIX_CHANNELS["ER"]])
    proxy.add_rule("403", match=denied.keys[PHENIX_CHANNELS["Mito"]])
    statuses = []
    ids = read_epoch(synthetic, d, "permanent", statuses=statuses)
    assert len(ids) == 24  # full batches: substitutes stand in
    assert missing.id not in ids and denied.id not in ids
    job = statuses[0]["jobs"][0]
    assert {q["field"] for q in job["quarantined"]} == {missing.id, denied.id}
    assert statuses[0]["quarantined"] == 2
    assert request("status", d.socket)["quarantined"] == 2  # cumulative: still counted after the job closed
    assert "quarantined field " + missing.id in d.log and "quarantined field " + denied.id in d.log
    assert "NoSuchKey" in d.log and "AccessDenied" in d.log


def test_corrupt_bytes_are_never_delivered(daemon, synthetic, proxy):
    d = daemon(*FAST, endpoint_url=proxy.url)
    victim = synthetic.manifest.fields[7]
    proxy.add_rule("corrupt", match=victim.keys[PHENIX_CHANNELS["DNA"]], first_n=1)   # once: then a good copy
    proxy.add_rule("corrupt", match="r02c01f02p01-ch2")  # always: quarantined
    ids = read_epoch(synthetic, d, "corrupt")  # check_pixels fails on any flipped byte that got through
    assert len(ids) == 24
    assert len(proxy.faults("corrupt")) >= 1


def test_corrupt_bytes_without_s3_checksums_are_never_delivered(daemon, synthetic, proxy):
    d = daemon(*FAST, endpoint_url=proxy.url)
    proxy.add_rule("corrupt", match="r01c02f01p01-ch5", strip_checksums=True)
    read_epoch(synthetic, d, "corrupt-nochecksum")


def test_a_rank_waiting_in_next_during_a_restart_gets_exactly_its_batch(daemon, synthetic, proxy, s3):
    import threading

    from prefetchd.dev.daemon_process import DaemonProcess
    from prefetchd.schedule import schedule

    d = daemon("s3.read_timeout_s=60", endpoint_url=proxy.url)
    stream = attach(synthetic.dataset, batch_size=4, socket=d.socket, job=f"restart-{os.getpid()}", cache_size=12,
                    prefetch_factor=1, reconnect_timeout_s=60, **RAW)
    second = None
    try:
        first = stream.next(0, 0)
        proxy.add_rule("stall", stall_s=120)  # every GET from now on hangs: the next batch cannot be ready
        result: dict = {}
        waiter = threading.Thread(target=lambda: result.update(batch=stream.next(0, 2)), daemon=True)
        waiter.start()
        wait_until(lambda: request("status", d.socket)["inflight_requests"] > 0, 30, "a GET to hang")
        d.stop()  # SIGTERM while the rank waits inside next()
        proxy.clear()
        second = DaemonProcess(d.socket, [f"s3.endpoint_url={proxy.url}", f"cache_dir={d.workdir / 'cache2'}"],
                               log_path=d.workdir / "second.log").start()
        waiter.join(timeout=90)
        assert not waiter.is_alive() and "batch" in result
        ids = sorted(f.id for f in synthetic.manifest.fields)
        expected = [ids[i] for i in schedule(len(ids), 0, 0, 0, 1, 4)]
        assert first.ids == expected[0:4] and result["batch"].ids == expected[8:12]
        check_pixels(synthetic, result["batch"])
        assert stream.reconnects == 1
    finally:
        stream.close()
        if second is not None:
            assert second.stop() == 0


def test_503_slowdown_lowers_the_get_concurrency_and_every_field_still_arrives(daemon, synthetic, proxy):
    """S3 throttling: the adaptive limiter (prefetchd/concurrency.py) backs off, nothing is lost."""
    import threading

    # retry_mode=standard: botocore's adaptive rate limiter on top makes this epoch take ~50 s instead of ~8 s.
    d = daemon(*FAST, "s3.max_concurrency=8", "s3.retry_mode=standard", endpoint_url=proxy.url)
    victim = synthetic.manifest.fields[3].keys[PHENIX_CHANNELS["RNA"]]
    # 4 = s3.retries + 1: botocore's own retries run out once, so the store sees SlowDown whatever layer
    # reports it; then a share of all GETs is throttled too.
    proxy.add_rule("503", match=victim, first_n=4)
    proxy.add_rule("503", probability=0.15)
    limits: list[int] = []
    stop = threading.Event()

    def poll() -> None:  # the limit climbs back once throttling stops: watch it while the epoch runs
        while not stop.is_set():
            limits.append(request("status", d.socket)["concurrency"]["limit"])
            stop.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        ids = read_epoch(synthetic, d, "slowdown")
    finally:
        stop.set()
        watcher.join(10)
    assert sorted(ids) == sorted(f.id for f in synthetic.manifest.fields)
    assert len(proxy.faults("503")) >= 4
    c = request("status", d.socket)["concurrency"]
    assert c["maximum"] == 8 and c["adaptive"] is True
    assert c["throttles"] >= 1 and c["decreases"] >= 1
    assert min(limits + [c["limit"]]) < c["maximum"], (limits, c)
    assert c["minimum"] <= c["limit"] <= c["maximum"]
    assert request("status", d.socket)["quarantined"] == 0


def test_a_get_limit_below_a_fields_channels_still_delivers_every_field_exactly(daemon, synthetic, proxy):
    """Throttling can lower the limit to 2 while a field has 5 channels: fields must not hold part of what they
    need and wait for the rest (they would deadlock each other); each runs its channels over the permits it got."""
    d = daemon(*FAST, "s3.max_concurrency=2", "s3.get_concurrency=fixed", endpoint_url=proxy.url)
    proxy.add_rule("reset", first_n=2)
    ids = read_epoch(synthetic, d, "narrow")
    assert sorted(ids) == sorted(f.id for f in synthetic.manifest.fields)
    c = request("status", d.socket)["concurrency"]
    assert c["limit"] == 2 and c["maximum"] == 2
    assert len(proxy.faults("reset")) == 2 and request("status", d.socket)["quarantined"] == 0
