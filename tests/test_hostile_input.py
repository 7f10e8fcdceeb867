"""Careless and hostile input at attach time: one-line errors that say what to change, checked before the
daemon allocates or computes anything from them, and a daemon that stays healthy for everyone else.
Also objects that are not what they claim (an 8-bit TIFF) and local data the daemon cannot see."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.delivery import SourceFields, Tally
from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.local_root import absolute_local_root, unseen_local_root_hint
from prefetchd.errors import ConfigError, PrefetchdError
from prefetchd.options import MAX_WORLD_SIZE, check_attach_sizes

from conftest import REPO_ROOT, Daemon, _daemon_env, _shut_down

RAW = {"illum": False, "clahe": False, "rescale": False}


def raw_attach(d, message: dict) -> dict:
    """Send one attach line as a hostile client would (any JSON, no client-side checks); return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(d.socket))
        s.sendall(json.dumps({"op": "attach", **message}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def assert_one_line_refusal(reply: dict, *needles: str) -> None:
    assert reply["ok"] is False and reply["code"] not in ("internal", "error"), reply
    assert "\n" not in reply["error"] and "\x00" not in reply["error"], reply
    for needle in needles:
        assert needle in reply["error"], reply


@pytest.mark.parametrize("options, needles", [
    ({"clahe": {"clip_limit": 1e308}}, ["clahe.clip_limit must be > 0 and <= 65536", "1e+308"]),
    ({"clahe": {"tile_grid": 1000}}, ["clahe.tile_grid must be an integer >= 1 and <= 64", "1000"]),
    ({"clahe": {"tile_grid": 32, "bins": 65536}}, ["lower tile_grid (at most 16 with 65536 bins)"]),
    ({"channels": 123}, ["channels must be a list of channel names", "accepted channels: Mito"]),
    ({"channels": {"DNA": 1}}, ["channels must be a list of channel names"]),
    ({"cache_size": 10**18}, ["cache_size must be an integer >= 1 and <= 2147483647"]),
    ({"prefetch_factor": 10**9}, ["prefetch_factor must be an integer >= 0 and <= 1024"]),
], ids=["clip-1e308", "tiles-1000", "tables-too-large", "channels-int", "channels-dict", "cache-1e18", "prefetch-1e9"])
def test_unbounded_options_are_refused_at_attach_with_one_line(daemon, synthetic, options, needles):
    d = daemon()
    reply = raw_attach(d, {"dataset": synthetic.dataset, "batch_size": 2, "job": "hostile", "options": options})
    assert_one_line_refusal(reply, *needles)
    status = request("status", d.socket)
    assert status["jobs"] == [] and status["shm_bytes"] == 0  # refused before anything was allocated


def test_non_finite_numbers_in_json_are_refused(daemon, synthetic):
    d = daemon()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # Python's json reads Infinity and NaN
        s.settimeout(60)
        s.connect(str(d.socket))
        for clahe in ('{"tile_grid": Infinity}', '{"clip_limit": NaN}', '{"bins": -Infinity}'):
            line = f'{{"op": "attach", "dataset": "{synthetic.dataset}", "batch_size": 2, "options": {{"clahe": {clahe}}}}}'
            s.sendall(line.encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
            assert_one_line_refusal(reply, "clahe.")


@pytest.mark.parametrize("dataset, needles", [
    ("s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images",
     ["dataset strings are not URLs", "JUMPS3MultiView:bucket=cellpainting-gallery:prefix=cpg0000-jump-pilot"]),
    ("JUMPS3MultiView:bucket=bücket:prefix=x", ["bucket names use only ASCII letters", "'bücket'"]),
    ("JUMPS3MultiView:bucket=a b", ["bucket names use only ASCII letters"]),
    ("JUMPS3MultiView:bucket=x:prefix=a\x00b", ["control character"]),
    ("JUMPS3MultiView:bucket=x:prefix=a\x00//b", ["control character"]),
], ids=["s3-url", "non-ascii-bucket", "space-in-bucket", "nul", "nul-placeholder"])
def test_malformed_dataset_strings_are_one_line_without_internals(daemon, dataset, needles):
    d = daemon()
    reply = raw_attach(d, {"dataset": dataset, "batch_size": 2})
    assert_one_line_refusal(reply, *needles)
    assert "regex" not in reply["error"] and "Invalid bucket name" not in reply["error"]
    assert "\\x00" not in reply["error"] or "\x00" in dataset  # no internal placeholder shown


def test_request_sizes_are_bounded_before_anything_is_planned():
    # For server.op_attach (the daemon calls it before it plans or allocates anything from these numbers).
    for args, needle in [((4, 0, MAX_WORLD_SIZE + 1, 1), f"world_size must be an integer >= 1 and <= {MAX_WORLD_SIZE}"),
                         ((4, 0, 10**12, 1), "world_size"), ((10**9, 0, 1, 1), "batch_size"),
                         ((4, 5, 2, 1), "rank must be an integer >= 0 and <= 1"), ((4, 0, 8, 10**6), "local_world_size"),
                         ((4, 0, True, 1), "world_size")]:
        with pytest.raises(ConfigError, match=needle):
            check_attach_sizes(*args)
    check_attach_sizes(256, 63, 64, 8)  # a large but real job passes


# ---- objects that are not what they claim -------------------------------------------------------------


@pytest.fixture
def local_copy(synthetic, tmp_path):
    """A private copy of the synthetic plates (tests may break objects in it)."""
    root = tmp_path / "copy"
    shutil.copytree(synthetic.root / synthetic.prefix, root / synthetic.prefix)
    return root


def test_an_8_bit_tiff_is_quarantined_with_the_reason_not_delivered(daemon, synthetic, local_copy):
    d = daemon()
    fields = synthetic.manifest.fields
    victim = fields[9]
    key = victim.keys[PHENIX_CHANNELS["ER"]]
    plane = tifffile.imread(synthetic.root / key)
    tifffile.imwrite(local_copy / key, (plane >> 8).astype(np.uint8), photometric="minisblack")  # an 8-bit export
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    tally = Tally(world_size=1, batches_per_epoch=len(fields) // 4, fields=source.ids, bad={victim.id})
    with attach(f"JUMPLocal:root={local_copy / synthetic.prefix}", batch_size=4, socket=d.socket,
                cache_size=len(fields), **RAW) as stream:
        for batch in stream.epoch(0):
            tally.add(0, 0, batch.index, batch.ids, [source.identify(f) for f in batch.images])
        job = stream.status()["jobs"][0]
    verdict = tally.judge()
    assert (verdict["lost"], verdict["duplicated"], verdict["wrong_pixels"], verdict["bad_fields_delivered"]) == \
        (0, 0, 0, 0), verdict["examples"]
    assert [q["field"] for q in job["quarantined"]] == [victim.id]
    assert "pixels are uint8, expected uint16" in job["quarantined"][0]["reason"]
    assert f"quarantined field {victim.id}" in d.log and "pixels are uint8" in d.log


# ---- local data: relative roots, and roots the daemon cannot see -------------------------------------------


def test_a_relative_local_root_means_relative_to_the_trainer(daemon, synthetic, monkeypatch):
    d = daemon()  # its working directory is the repository, not the data
    monkeypatch.chdir(synthetic.root)
    with attach(f"JUMPLocal:root={synthetic.prefix}", batch_size=4, socket=d.socket, cache_size=12, **RAW) as stream:
        assert len(next(iter(stream.epoch(0))).ids) == 4
    assert absolute_local_root("JUMPLocal:root=x:max_samples=3") == f"JUMPLocal:root={synthetic.root}/x:max_samples=3"
    assert absolute_local_root("JUMPLocal:root=/abs/x") == "JUMPLocal:root=/abs/x"
    assert absolute_local_root("JUMPS3MultiView:bucket=b:prefix=p") == "JUMPS3MultiView:bucket=b:prefix=p"


def test_hints_for_roots_hidden_by_the_service_sandbox(tmp_path):
    assert unseen_local_root_hint(f"JUMPLocal:root={tmp_path}/missing") is None  # missing here too: no hint
    tmp_hint = unseen_local_root_hint(f"JUMPLocal:root={tmp_path}")
    assert str(tmp_path).startswith("/tmp/") and "PrivateTmp=yes" in tmp_hint and "BindReadOnlyPaths" not in tmp_hint
    assert "\n" not in tmp_hint and "docs/operations.md" in tmp_hint


def _unshare_available() -> bool:
    if shutil.which("unshare") is None or not Path("/home").is_dir():
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs root and unshare to give the daemon its own /home")
def test_local_data_under_home_that_a_sandboxed_daemon_cannot_see_is_one_line_with_the_fix(daemon, synthetic, s3):
    # The daemon runs as under ProtectHome=yes: an empty /home in its own mount namespace.
    data = Path(tempfile.mkdtemp(prefix="pfd-data-", dir="/home"))
    workdir = Path(tempfile.mkdtemp(prefix="pfd-", dir="/tmp"))
    sandboxed = None
    try:
        shutil.copytree(synthetic.root / synthetic.prefix, data / "images")
        dataset = f"JUMPLocal:root={data / 'images'}"
        with attach(dataset, batch_size=4, socket=daemon().socket, cache_size=12, **RAW) as stream:  # unsandboxed: works
            assert len(next(iter(stream.epoch(0))).ids) == 4
        sock = workdir / "p.sock"
        serve = (f"mount -t tmpfs -o ro,mode=0755 tmpfs /home && exec {sys.executable} -m prefetchd serve "
                 f"--socket {sock} --set cache_dir={workdir / 'cache'} --set s3.endpoint_url={s3.endpoint_url}")
        log_path = workdir / "daemon.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", serve],
                                    cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=_daemon_env(None),
                                    start_new_session=True)
        sandboxed = Daemon(socket=sock, proc=proc, log_path=log_path, workdir=workdir)
        sandboxed.wait_ready()
        with pytest.raises(PrefetchdError) as info:
            attach(dataset, batch_size=4, socket=sock, job=f"home-{uuid.uuid4().hex[:8]}", cache_size=12, **RAW)
        message = str(info.value)
        assert "\n" not in message and info.value.code == "no_root"
        assert f"the prefetchd daemon cannot read {data / 'images'}, though this process can" in message
        assert "ProtectHome=yes" in message and f"BindReadOnlyPaths={data / 'images'}" in message
        assert request("ping", sock)["ok"]
    finally:
        problem = _shut_down(sandboxed) if sandboxed is not None else None
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    assert problem is None, problem


# ---- job ids and shared-memory names --------------------------------------------------------------------


def test_distinct_job_ids_never_share_a_segment_name():
    from prefetchd.shm.arena import arena_name

    assert arena_name("exiting-1234") == "prefetchd-exiting-1234"       # clean ids keep their readable name
    names = {arena_name(job) for job in ("team/run1", "team_run1", "team:run1", "team run1", "x" * 300, "x" * 301)}
    assert len(names) == 6
    assert all(len(n) <= 255 and "/" not in n for n in names)


def test_jobs_whose_ids_sanitise_alike_run_side_by_side(daemon, synthetic):
    d = daemon()
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    streams = [attach(synthetic.dataset, batch_size=4, socket=d.socket, job=job, cache_size=12, **RAW)
               for job in (f"team/{d.proc.pid}", f"team_{d.proc.pid}")]
    try:
        assert streams[0].layout.name != streams[1].layout.name
        for stream in streams:
            batch = stream.next(0, 0)
            assert [source.identify(f).field for f in batch.images] == batch.ids
    finally:
        for stream in streams:
            stream.close()


def test_a_job_id_taken_on_another_daemon_never_suggests_deleting_its_arena(daemon, synthetic):
    first, second = daemon(), daemon()
    job = f"shared-{uuid.uuid4().hex[:8]}"
    with attach(synthetic.dataset, batch_size=2, socket=first.socket, job=job, cache_size=12, **RAW):
        with pytest.raises(PrefetchdError) as info:
            attach(synthetic.dataset, batch_size=2, socket=second.socket, job=job, cache_size=12, **RAW)
        message = str(info.value)
        assert f"belongs to a job of another running prefetchd daemon (pid {first.proc.pid})" in message
        assert "different job id" in message and "rm " not in message
