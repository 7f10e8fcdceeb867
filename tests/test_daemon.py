"""The spine end to end: moto S3 → `prefetchd serve` → shared memory → client, all real parts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from prefetchd.dev import synth
from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.errors import DaemonNotRunning, PrefetchdError
from prefetchd.preprocess import illum_correct
from prefetchd.schedule import schedule
from prefetchd.shm.arena import read_owner_pid

from bench.delivery import SourceFields, Tally
from conftest import REPO_ROOT, shm_segments, wait_until

RAW = {"illum": False, "clahe": False, "rescale": False}
# Job ids, and so /dev/shm names, unique to this test run: other runs may share the machine.
EXITING, CRASH = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("exiting", "crash"))
OPENCV_CLAHE = {"clip_limit": 3.0, "tile_grid": 8, "bins": 65536}


def raw_channel(synthetic, field_id: str, channel: str) -> np.ndarray:
    key = synthetic.manifest.field_by_id(field_id).keys[PHENIX_CHANNELS[channel]]
    return tifffile.imread(synthetic.root / key)


def illum_of(synthetic, field_id: str, channel: str) -> np.ndarray:
    f = synthetic.manifest.field_by_id(field_id)
    return np.load(synthetic.root / synthetic.manifest.illum_keys[f"{f.batch}/{f.barcode}"][channel])


def assert_signature(image: np.ndarray, field_id: str, channel: str) -> None:
    plate, well, site = field_id.split("/")
    expected = synth.expected_signature(plate, well, int(site), PHENIX_CHANNELS[channel])
    np.testing.assert_array_equal(image[0, : len(expected)], expected, err_msg=f"{field_id} {channel}")


def test_raw_pixels_are_exact_16_bit_in_channel_order(daemon, synthetic):
    d = daemon()
    n = synthetic.spec.field_count
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=n, **RAW) as stream:
        assert stream.channels == list(DEFAULT_CHANNELS)
        assert stream.shape == (5, synthetic.spec.height, synthetic.spec.width)
        seen = []
        for batch in stream.epoch(0):
            last_batch_max = int(batch.images.max())
            assert batch.images.dtype == np.uint16 and batch.images.shape[1:] == stream.shape
            for i, field_id in enumerate(batch.ids):
                for c, channel in enumerate(DEFAULT_CHANNELS):
                    np.testing.assert_array_equal(batch.images[i, c], raw_channel(synthetic, field_id, channel))
                    assert_signature(batch.images[i, c], field_id, channel)
            seen += batch.ids
    # after close the view is unmapped: reading the last batch must not crash, and reads zeros
    assert last_batch_max > 255 and int(batch.images.max()) == 0
    assert sorted(seen) == sorted(f.id for f in synthetic.manifest.fields)


def test_illum_and_clahe_equal_opencv_on_the_same_uint16_input(daemon, synthetic):
    d = daemon()
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=24, illum=True,
                clahe=OPENCV_CLAHE, rescale=False) as stream:
        batch = next(iter(stream.epoch(0)))
        clahe = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8))
        for i, field_id in enumerate(batch.ids):
            for c, channel in enumerate(DEFAULT_CHANNELS):
                corrected = illum_correct(raw_channel(synthetic, field_id, channel), illum_of(synthetic, field_id, channel))
                np.testing.assert_array_equal(batch.images[i, c], clahe.apply(corrected))


def test_local_copy_serves_the_same_pixels_as_s3(daemon, synthetic):
    d = daemon()
    with attach(synthetic.local_dataset, batch_size=8, socket=d.socket, cache_size=24, **RAW) as stream:
        batch = next(iter(stream.epoch(3)))
        for i, field_id in enumerate(batch.ids):
            np.testing.assert_array_equal(batch.images[i, 0], raw_channel(synthetic, field_id, "DNA"))
        all_ids = sorted(f.id for f in synthetic.manifest.fields)  # the same order a trainer computes
        assert batch.ids == [all_ids[i] for i in schedule(len(all_ids), 0, 3, 0, 1, 8)[:8]]
        status = stream.status()
    assert status["bytes_fetched"] > 0


def test_second_epoch_of_a_cache_sized_dataset_issues_zero_gets(daemon, synthetic):
    d = daemon()
    n = synthetic.spec.field_count
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=n, **RAW) as stream:
        first = [i for b in stream.epoch(0) for i in b.ids]
        after_first = stream.status()
        second = [i for b in stream.epoch(1) for i in b.ids]
        after_second = stream.status()
    assert sorted(first) == sorted(second) and first != second  # reshuffled, same set
    assert after_second["gets"] == after_first["gets"]
    assert after_second["bytes_fetched"] == after_first["bytes_fetched"]
    job = after_second["jobs"][0]
    assert job["epochs"]["1"]["hit_rate"] == 1.0 and job["epochs"]["0"]["hit_rate"] == 0.0


def test_status_counters_agree_with_what_was_read(daemon, synthetic):
    d = daemon()
    n = synthetic.spec.field_count
    with attach(synthetic.dataset, batch_size=5, socket=d.socket, cache_size=n, **RAW) as stream:
        read = sum(len(b.ids) for b in stream.epoch(0))
        status = stream.status()
    required = {"uptime_s", "jobs", "fields_served", "cache_hits", "cache_misses", "hit_rate", "bytes_fetched",
                "fetch_mb_per_s", "inflight_requests", "retries", "quarantined", "shm_bytes", "slots", "stall_s"}
    assert required <= set(status)
    assert status["fields_served"] == read == n
    assert status["cache_hits"] + status["cache_misses"] == read
    assert status["gets"] == 5 * n  # raw: no illum files fetched
    tiff_bytes = sum((synthetic.root / k).stat().st_size for f in synthetic.manifest.fields for k in f.keys.values())
    assert status["bytes_fetched"] == tiff_bytes
    assert status["shm_bytes"] >= n * 5 * synthetic.spec.height * synthetic.spec.width * 2
    assert sum(status["slots"].values()) == n
    assert status["inflight_requests"] == 0 and status["retries"] == 0 and status["quarantined"] == 0


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from prefetchd.client import attach
    socket, dataset, rank, world, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    with attach(dataset, batch_size=3, seed=7, rank=rank, world_size=world, socket=socket, job="ranks",
                cache_size=24, illum=False, clahe=False, rescale=False) as stream:
        for epoch in range(epochs):
            ids = [i for b in stream.epoch(epoch) for i in b.ids]
            print(json.dumps({"epoch": epoch, "ids": ids}), flush=True)
""")


def run_ranks(d, dataset: str, world: int, epochs: int = 1) -> list[list[dict]]:
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(d.socket), dataset, str(r), str(world), str(epochs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, text=True)
             for r in range(world)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    return outputs


def test_ranks_in_separate_processes_get_disjoint_shards_covering_every_field(daemon, synthetic):
    d = daemon()
    outputs = run_ranks(d, synthetic.dataset, world=2, epochs=2)
    all_ids = sorted(f.id for f in synthetic.manifest.fields)
    for epoch in range(2):
        shards = [out[epoch]["ids"] for out in outputs]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == all_ids
        for rank, shard in enumerate(shards):  # the trainer can compute the same order itself
            order = schedule(len(all_ids), 7, epoch, rank, 2, 3)
            assert shard == [all_ids[i] for i in order]
    assert request("status", d.socket)["gets"] == 5 * len(all_ids)  # no field fetched twice


def test_leased_batch_survives_evictions_by_another_rank(daemon, synthetic):
    d = daemon()
    opts = dict(socket=d.socket, job="lease", cache_size=12, prefetch_factor=1, **RAW)
    holder = attach(synthetic.dataset, batch_size=2, rank=0, world_size=2, **opts)
    other = attach(synthetic.dataset, batch_size=2, rank=1, world_size=2, **opts)
    try:
        held = holder.next(0, 0)
        snapshot = held.images.copy()
        for epoch in range(3):  # 12 fields per rank per epoch through a 12-slot cache: constant eviction
            for batch in other.epoch(epoch):
                for i, field_id in enumerate(batch.ids):
                    assert_signature(batch.images[i, 0], field_id, "DNA")
        np.testing.assert_array_equal(held.images, snapshot)
        for i, field_id in enumerate(held.ids):
            assert_signature(held.images[i, 0], field_id, "DNA")
        assert request("status", d.socket)["gets"] > 5 * 12  # evictions really happened
    finally:
        holder.close()
        other.close()


def test_a_client_exiting_never_unlinks_the_arena_and_stop_removes_it(daemon, synthetic):
    d = daemon()
    script = textwrap.dedent(f"""
        import os
        from prefetchd.client import attach
        s = attach({synthetic.dataset!r}, batch_size=2, socket={str(d.socket)!r}, job={EXITING!r}, cache_size=8,
                   illum=False, clahe=False)
        next(iter(s.epoch(0)))
        os._exit(0)  # no close, no detach: like a crashed trainer
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT, timeout=120)
    assert f"prefetchd-{EXITING}" in shm_segments()
    with attach(synthetic.dataset, batch_size=2, socket=d.socket, job=EXITING, cache_size=8,
                illum=False, clahe=False) as again:  # reattach with the same job id resumes
        assert len(next(iter(again.epoch(0))).ids) == 2
    result = subprocess.run([sys.executable, "-m", "prefetchd", "stop", "--socket", str(d.socket)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert d.proc.wait(timeout=30) == 0
    d.stopped = True
    assert not d.socket.exists()
    assert f"prefetchd-{EXITING}" not in shm_segments()


def test_sigterm_while_a_client_waits_drains_and_exits_zero(daemon, synthetic):
    d = daemon()
    stream = attach(synthetic.dataset, batch_size=2, socket=d.socket, cache_size=24, reconnect_timeout_s=0.5, **RAW)
    try:
        next(iter(stream.epoch(0)))
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        d.stopped = True
        with pytest.raises(DaemonNotRunning, match="did not come back within 0 s|closed the connection|no prefetchd"):
            for _ in stream.epoch(0):
                pass
    finally:
        stream.close()
    assert not any(s.startswith("prefetchd-") for s in shm_segments() if s.endswith(stream.job))


# ---- bad input: one clear line, no traceback ------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefetchd", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", ["status", "stop"])
def test_no_daemon_listening_is_one_line(tmp_path, command):
    result = run_cli(command, "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no prefetchd daemon is listening" in result.stderr and "prefetchd serve" in result.stderr


def test_attach_errors_name_what_to_change(daemon, synthetic):
    d = daemon()
    with pytest.raises(PrefetchdError, match="accepted names: JUMPS3MultiView, JUMPLocal"):
        attach("JUMPS3:bucket=x", batch_size=2, socket=d.socket)
    with pytest.raises(PrefetchdError, match="unknown key 'bukket'.*accepted keys: bucket, prefix"):
        attach("JUMPS3MultiView:bukket=x", batch_size=2, socket=d.socket)
    with pytest.raises(PrefetchdError, match="malformed part"):
        attach("JUMPS3MultiView:bucket", batch_size=2, socket=d.socket)
    with pytest.raises(PrefetchdError, match="unknown attach option.*accepted: channels"):
        attach(synthetic.dataset, batch_size=2, socket=d.socket, cache_sise=3)
    with pytest.raises(PrefetchdError, match=r"raise cache_size to at least 12"):
        attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=4, prefetch_factor=2)
    with pytest.raises(PrefetchdError, match=r"GiB of shared memory but only .* lower cache_size"):
        attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=100_000_000, **RAW)
    with pytest.raises(PrefetchdError, match="NoSuchBucket|does not exist"):
        attach(f"JUMPS3MultiView:bucket=no-such-bucket:prefix={synthetic.prefix}", batch_size=2, socket=d.socket)
    with pytest.raises(PrefetchdError, match="no objects under s3://synthetic-jump/not/there/: fix prefix="):
        attach(f"JUMPS3MultiView:bucket={synthetic.bucket}:prefix=not/there", batch_size=2, socket=d.socket)
    # a refused attach leaves nothing behind: no job, no arena
    status = request("status", d.socket)
    assert status["jobs"] == [] and status["shm_bytes"] == 0
    assert not [name for name in shm_segments() if read_owner_pid(name) == d.proc.pid]
    # and the daemon is still healthy after all of that
    with attach(synthetic.dataset, batch_size=2, socket=d.socket, cache_size=24, **RAW) as stream:
        assert len(next(iter(stream.epoch(0))).ids) == 2
        assert request("status", d.socket)["shm_bytes"] > 0


def test_endpoint_unreachable_is_reported_on_attach(daemon, synthetic):
    import socket as sk

    with sk.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    d = daemon("s3.retries=0", "s3.connect_timeout_s=1", endpoint_url=dead)
    with pytest.raises(PrefetchdError, match="127.0.0.1"):
        attach(f"JUMPS3MultiView:bucket=fresh-bucket:prefix={synthetic.prefix}", batch_size=2, socket=d.socket)


def test_client_raises_daemon_not_running(tmp_path):
    with pytest.raises(DaemonNotRunning, match="prefetchd serve"):
        attach("JUMPLocal:root=/x", batch_size=1, socket=tmp_path / "none.sock")


def test_daemon_killed_mid_epoch_and_restarted_loses_and_duplicates_nothing(synthetic, tmp_path_factory):
    """Judged from the pixels the reader received, not from the ids in the daemon's replies."""
    from prefetchd.dev.daemon_process import DaemonProcess

    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    tally = Tally(world_size=1, batches_per_epoch=synthetic.spec.field_count // 3, fields=source.ids)
    workdir = Path(tempfile.mkdtemp(prefix="pfd-", dir="/tmp"))
    overrides = [f"s3.endpoint_url={synthetic.endpoint_url}", f"cache_dir={workdir / 'cache'}"]
    first = DaemonProcess(workdir / "p.sock", overrides, log_path=workdir / "log").start()
    second = None
    stream = attach(synthetic.dataset, batch_size=3, socket=first.socket, job=CRASH, cache_size=24,
                    reconnect_timeout_s=60, **RAW)

    def receive(batch) -> None:
        tally.add(0, batch.epoch, batch.index, batch.ids, [source.identify(field) for field in batch.images])

    try:
        batches = stream.epoch(0)
        for _ in range(3):
            receive(next(batches))
        first.proc.kill()  # SIGKILL: no drain, the arena is left behind
        first.proc.wait()
        assert f"prefetchd-{CRASH}" in shm_segments()
        second = DaemonProcess(workdir / "p.sock", overrides, log_path=workdir / "log").start()
        for batch in batches:
            receive(batch)
        assert stream.reconnects == 1
        verdict = tally.judge()
        assert verdict["epochs_complete"] == 1 and verdict["fields_delivered"] == synthetic.spec.field_count
        assert (verdict["lost"], verdict["duplicated"], verdict["wrong_pixels"], verdict["mislabelled"]) == (0, 0, 0, 0), \
            verdict["examples"]
        # the dead daemon's arena was reaped and the job's arena made anew by the second daemon
        assert read_owner_pid(f"prefetchd-{CRASH}") == second.proc.pid
    finally:
        stream.close()
        if second is not None:
            assert second.stop() == 0
        first.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert f"prefetchd-{CRASH}" not in shm_segments()


def test_a_bucket_that_is_not_public_is_reported_as_403_with_the_fix(daemon, synthetic, s3):
    bucket = s3.create_private_bucket("private-jump")
    client = s3.client()
    for key in synthetic.manifest.fields[0].keys.values():
        client.upload_file(str(synthetic.root / key), bucket, key)
    d = daemon()
    with pytest.raises(PrefetchdError, match=r"403.*not public or needs credentials.*s3.unsigned=false") as info:
        attach(f"JUMPS3MultiView:bucket={bucket}:prefix={synthetic.prefix}", batch_size=1, socket=d.socket,
               cache_size=4, prefetch_factor=1)
    assert info.value.code == "access_denied"


def test_belady_beats_lru_when_the_dataset_is_larger_than_the_cache(daemon, synthetic):
    d = daemon()
    rates = {}
    for policy in ("lru", "belady"):
        with attach(synthetic.local_dataset, batch_size=2, socket=d.socket, job=policy, cache_size=12,
                    prefetch_factor=1, policy=policy, **RAW) as stream:
            for epoch in range(4):
                for batch in stream.epoch(epoch):
                    for i, field_id in enumerate(batch.ids):
                        assert_signature(batch.images[i, 2], field_id, "RNA")
            job = next(j for j in stream.status()["jobs"] if j["job"] == policy)
        later = [v for e, v in job["epochs"].items() if e != "0"]
        rates[policy] = sum(v["hits"] for v in later) / sum(v["served"] for v in later)
    assert rates["belady"] > rates["lru"] > 0
