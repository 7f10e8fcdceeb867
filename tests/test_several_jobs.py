"""Several runs on one node, at the counts that matter (48 plates over 2 batches, 8 ranks, two jobs):
illumination fetched once per plate for every job, independent runs side by side, jobs that share what is
cached, eight ranks each at its own pace.

Judged from outside the daemon: GETs from the S3 side (tests/faultproxy.py's request log, bytes from the sizes
of the objects it served), identity from the pixels ranks received (the row-0 signature of every channel,
which illumination correction leaves intact), and ranks are real processes (tests/rank_process.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.dev import synth
from prefetchd.errors import ConfigError
from prefetchd.job_id import job_id_for

from conftest import REPO_ROOT, free_port, wait_until
from faultproxy import FaultProxy

PIX = {"illum": True, "rescale": False, "clahe": False}   # illumination applied; signatures survive it
LAUNCHER_VARS = ("PREFETCHD_JOB", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                 "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                 "LOCAL_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_STEP_ID")
RANK_TIMEOUT_S = 300


@pytest.fixture
def proxy(s3):
    with FaultProxy(upstream=s3.endpoint_url) as p:
        yield p


# ---------------------------------------------------------------------------------------------
# What the S3 side saw, and what ranks received


def gets(proxy: FaultProxy, suffix: str) -> list[str]:
    return [r.path for r in list(proxy.log) if r.method == "GET" and r.path.endswith(suffix)]


def served_bytes(paths: list[str], data: "synth.SynthManifest", bucket: str) -> int:
    """Bytes of the objects behind GET paths (`/bucket/key`), from the source files."""
    return sum((data.root / p.split(f"/{bucket}/", 1)[1]).stat().st_size for p in paths)


def identify(spec: synth.SynthSpec, signatures: list[list[int]]) -> str | None:
    """The field id that a delivered field's channel signatures spell, None unless every channel agrees."""
    folders = {synth.plate_code(p.folder): p.folder for p in spec.plates}
    ids = set()
    for name, values in zip(DEFAULT_CHANNELS, signatures):
        code, row, col, site, channel = (v - synth.SIGNATURE_OFFSET for v in values)
        if channel != PHENIX_CHANNELS[name] or code not in folders:
            return None
        ids.add(f"{folders[code]}/{synth.well_name(row, col)}/{site}")
    return ids.pop() if len(ids) == 1 else None


def judge(records: list[dict], spec: synth.SynthSpec, epochs: int) -> dict[str, str]:
    """Every epoch: each field exactly once over the ranks, identified from its pixels, under its own id.
    Returns field id -> digest of its pixels (the same every time it arrived)."""
    all_ids = sorted(f.id for f in synth.build_manifest(spec).fields)
    digests: dict[str, str] = {}
    for epoch in range(epochs):
        got = collections.Counter()
        for record in records:
            for b in (b for b in record["batches"] if b["epoch"] == epoch):
                for claimed, signature, digest in zip(b["ids"], b["signatures"], b["digests"]):
                    field_id = identify(spec, signature)
                    assert field_id == claimed, f"epoch {epoch}: claimed {claimed}, pixels are {field_id}"
                    assert digests.setdefault(field_id, digest) == digest, f"{field_id}: different pixels"
                    got[field_id] += 1
        assert sorted(got) == all_ids, f"epoch {epoch}: {len(all_ids) - len(got)} fields lost"
        assert set(got.values()) == {1}, f"epoch {epoch}: duplicated {[f for f, n in got.items() if n > 1][:5]}"
    return digests


# ---------------------------------------------------------------------------------------------
# Ranks as processes


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def torchrun_env(run_id: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    """A worker's environment as torchrun's local elastic agent sets it."""
    return clean_env(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                     WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port), TORCHELASTIC_RUN_ID=run_id, TORCHELASTIC_RESTART_COUNT="0",
                     TORCHELASTIC_MAX_RESTARTS="0")


class Ranks:
    """Rank processes started together; `wait_done()`, `release()` (when started with hold), `records()`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, env: dict[str, str], **args) -> None:
        out = self.workdir / f"rank-{len(self.procs)}.json"
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "rank_process.py"),
                                 json.dumps({**args, "out": str(out)})], cwd=REPO_ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append((proc, out))

    def wait_done(self) -> None:
        for proc, _ in self.procs:   # each prints `done` once its record is written
            line = _readline(proc, RANK_TIMEOUT_S)
            if line.strip() != "done":
                proc.kill()
                pytest.fail(f"rank process exited {proc.wait()}: {proc.stderr.read()[-3000:]}")

    def release(self) -> None:
        for proc, _ in self.procs:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write("\n")
                proc.stdin.flush()
        for proc, _ in self.procs:
            assert proc.wait(RANK_TIMEOUT_S) == 0, proc.stderr.read()[-3000:]

    def records(self) -> list[dict]:
        return [json.loads(out.read_text()) for _, out in self.procs]

    def kill(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    """A line from the process's stdout, or "" if it exits or `timeout_s` passes first."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return proc.stdout.readline()


@pytest.fixture
def ranks(tmp_path):
    group = Ranks(tmp_path)
    yield group
    group.kill()


# ---------------------------------------------------------------------------------------------
# 1. Illumination once


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def read_epochs(data, socket: Path, job: str, seed: int, epochs: int, cache_size: int) -> dict:
    """One rank in this process: what it received, recorded as `rank_process.py` records it."""
    with attach(data.dataset, batch_size=4, seed=seed, socket=socket, job=job, cache_size=cache_size, **PIX) as s:
        return {"batches": [{"epoch": e, "ids": b.ids, "signatures": b.images[:, :, 0, :5].tolist(),
                             "digests": [hashlib.blake2b(f.tobytes(), digest_size=16).hexdigest() for f in b.images]}
                            for e in range(epochs) for b in s.epoch(e)]}


def test_illumination_is_fetched_once_per_plate_for_all_jobs(daemon, many_plates, proxy):
    port = free_port()
    d = daemon(f"metrics.port={port}", endpoint_url=proxy.url)
    n, plates = many_plates.spec.field_count, len(many_plates.spec.plates)
    for job, seed in (("first", 1), ("second", 2)):   # two jobs, each two epochs in its own random order
        judge([read_epochs(many_plates, d.socket, job, seed, 2, cache_size=n // 3)], many_plates.spec, 2)
    npy = gets(proxy, ".npy")
    assert len(npy) == 5 * plates and len(set(npy)) == 5 * plates   # every file once, over both jobs
    status = request("status", d.socket)
    assert status["illum_gets"] == 5 * plates and status["illum"]["plates"] == plates
    assert status["illum_bytes_fetched"] == served_bytes(npy, many_plates.manifest, many_plates.bucket)
    assert status["image_gets"] == len(gets(proxy, ".tiff")) and status["illum"]["warning"] is None
    assert status["illum"]["bytes"] == plates * 5 * 48 * 48 * 4   # float32 arrays held
    m = scrape(port)
    assert m["prefetchd_illum_gets_total"] == 5 * plates and m["prefetchd_image_gets_total"] == status["image_gets"]
    assert m["prefetchd_illum_plates"] == plates and m["prefetchd_illum_bytes"] == status["illum"]["bytes"]
    assert m["prefetchd_illum_fetched_bytes_total"] == status["illum_bytes_fetched"]


def test_beyond_the_budget_least_recently_used_plates_go_with_a_warning(daemon, many_plates, proxy):
    plate_bytes = 5 * 48 * 48 * 4
    d = daemon(f"illum.budget_bytes={6 * plate_bytes}", endpoint_url=proxy.url)
    n = many_plates.spec.field_count
    judge([read_epochs(many_plates, d.socket, "tight", 3, 2, cache_size=n // 3)], many_plates.spec, 2)
    status = request("status", d.socket)
    illum = status["illum"]
    assert illum["bytes"] <= 6 * plate_bytes and illum["evictions"] > 0
    assert len(gets(proxy, ".npy")) > 5 * len(many_plates.spec.plates)   # dropped plates were fetched again
    assert "raise illum.budget_bytes" in illum["warning"] and "raise illum.budget_bytes" in d.log
    shown = subprocess.run([sys.executable, "-m", "prefetchd", "status", "--socket", str(d.socket)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert "raise illum.budget_bytes" in shown.stdout and "illumination held" in shown.stdout, shown.stdout


def test_illumination_files_are_kept_by_the_disk_tier_across_restarts(daemon, many_plates, proxy, tmp_path):
    tier = (f"disk_cache.dir={tmp_path / 'objects'}", "disk_cache.max_bytes=100000000")
    n, plates = many_plates.spec.field_count, len(many_plates.spec.plates)
    first = daemon(*tier, endpoint_url=proxy.url)
    judge([read_epochs(many_plates, first.socket, "before", 0, 1, cache_size=n // 3)], many_plates.spec, 1)
    first.stop()
    assert len(gets(proxy, ".npy")) == 5 * plates
    proxy.log.clear()
    second = daemon(*tier, endpoint_url=proxy.url)   # a fresh daemon: empty illumination store, same disk tier
    judge([read_epochs(many_plates, second.socket, "after", 0, 1, cache_size=n // 3)], many_plates.spec, 1)
    assert gets(proxy, ".npy") == [] and gets(proxy, ".tiff") == []
    assert request("status", second.socket)["illum"]["plates"] == plates


def test_the_illumination_store_keeps_the_least_recently_used_plates(many_plates, proxy):
    """The store alone over a real S3 store: plates asked for one at a time in a random order with repeats;
    the GETs the S3 side sees are exactly those of an LRU cache of `budget` plates."""
    from concurrent.futures import ThreadPoolExecutor

    from prefetchd.config import Config
    from prefetchd.illum import IllumStore
    from prefetchd.storage import S3Location
    from prefetchd.stores import Stores

    plates = [f"{p.batch}/{p.barcode}" for p in many_plates.spec.plates]
    keys = {k: tuple(many_plates.manifest.illum_keys[k][s] for s in ("DNA", "ER", "RNA", "AGP", "Mito")) for k in plates}
    rng = random.Random(7)
    order = [rng.choice(plates[:12]) if rng.random() < 0.5 else rng.choice(plates) for _ in range(150)]
    budget_plates = 5

    async def run() -> IllumStore:
        config = Config.load(overrides=[f"s3.endpoint_url={proxy.url}"])
        stores = Stores(config.tree["s3"], config.tree["disk_cache"])
        with ThreadPoolExecutor(2) as pool:
            store_of = IllumStore(pool, budget_bytes=budget_plates * 5 * 48 * 48 * 4)
            async with contextlib.AsyncExitStack() as stack:
                await stores.open(stack)
                store = S3Location(many_plates.bucket).make_store(stores)
                for plate in order:
                    arrays = await store_of.plate("space", store, plate, keys[plate], 5)
                    assert [a.shape for a in arrays] == [(48, 48)] * 5
        return store_of

    illum = asyncio.run(run())
    lru: collections.OrderedDict[str, None] = collections.OrderedDict()
    expected = []
    for plate in order:
        if plate in lru:
            lru.move_to_end(plate)
            continue
        expected.append(plate)
        lru[plate] = None
        if len(lru) > budget_plates:
            lru.popitem(last=False)
    seen = [p.split("/illum/", 1)[1].split("/")[0] for p in gets(proxy, ".npy")[::5]]
    assert seen == [p.split("/")[1] for p in expected]
    assert illum.evictions == len(expected) - budget_plates and len(expected) > 2 * budget_plates


# ---------------------------------------------------------------------------------------------
# 2. Independent runs; ranks of one run


def test_two_identical_single_process_runs_side_by_side_both_complete(daemon, many_plates, ranks):
    d = daemon()
    args = dict(dataset=many_plates.dataset, socket=str(d.socket), batch_size=4, epochs=1,
                options={"cache_size": 24, **PIX})
    for _ in range(2):   # an lr sweep: the same arguments, one process each, no job id
        ranks.start(clean_env(), **args)
    ranks.wait_done()
    ranks.release()
    first, second = ranks.records()
    assert first["job"] != second["job"]
    judge([first], many_plates.spec, 1)
    judge([second], many_plates.spec, 1)


def test_raw_protocol_clients_without_a_job_id_are_jobs_of_their_own(daemon, many_plates):
    d = daemon()
    attach_line = json.dumps({"op": "attach", "dataset": many_plates.dataset, "batch_size": 4, "seed": 0,
                              "rank": 0, "world_size": 1, "options": {"cache_size": 12, **PIX}}).encode() + b"\n"
    with contextlib.ExitStack() as stack:
        replies = []
        for _ in range(2):   # the same request twice, no job id: two runs side by side
            conn = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            conn.settimeout(60)
            conn.connect(str(d.socket))
            conn.sendall(attach_line)
            replies.append(json.loads(stack.enter_context(conn.makefile("rb")).readline()))
        assert [r["ok"] for r in replies] == [True, True], replies
        assert replies[0]["job"] != replies[1]["job"]
        jobs = {j["job"] for j in request("status", d.socket, timeout=30)["jobs"]}
        assert {replies[0]["job"], replies[1]["job"]} <= jobs


def test_job_ids_follow_the_launcher():
    same = dict(dataset="JUMPLocal:root=/x", batch_size=4, seed=0, options={})
    static = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert job_id_for(world_size=2, env=static, **same) == job_id_for(world_size=2, env=static, **same)
    assert job_id_for(world_size=2, env=static, **same) != job_id_for(world_size=2, env={**static, "MASTER_PORT": "29501"}, **same)
    elastic = {"TORCHELASTIC_RUN_ID": "3f2a", "MASTER_ADDR": "node1", "MASTER_PORT": "41000"}
    restarted = {**elastic, "MASTER_PORT": "41777"}   # c10d picks a new port per rendezvous round
    assert job_id_for(world_size=2, env=elastic, **same) == job_id_for(world_size=2, env=restarted, **same)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert job_id_for(world_size=4, env=slurm, **same) != job_id_for(world_size=4, env={**slurm, "SLURM_STEP_ID": "1"}, **same)
    assert job_id_for(world_size=1, env=slurm, **same) != job_id_for(world_size=1, env=slurm, **same)  # sweep in one allocation
    assert job_id_for(world_size=1, env={}, **same) != job_id_for(world_size=1, env={}, **same)
    with pytest.raises(ConfigError, match="pass job="):
        job_id_for(world_size=2, env={}, **same)


def test_a_world_size_above_one_without_a_launcher_asks_for_a_job_id(daemon, many_plates):
    d = daemon()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    script = (f"from prefetchd.client import attach\n"
              f"attach({many_plates.dataset!r}, batch_size=4, rank=0, world_size=2, socket={str(d.socket)!r})")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "pass job=<id> to attach" in proc.stderr


# ---------------------------------------------------------------------------------------------
# 3. Jobs share what is cached


def run_two_rank_jobs(ranks: Ranks, socket: Path, data, ports: list[int], cache_size: int) -> tuple[list[dict], dict]:
    """Each a torchrun job of 2 ranks (plain torchrun names every run "none"); returns what the ranks received
    and the daemon's status while every rank was still attached."""
    for j, port in enumerate(ports):
        for rank in range(2):
            ranks.start(torchrun_env("none", rank, 2, port), dataset=data.dataset, socket=str(socket), hold=True,
                        batch_size=4, epochs=2, options={"cache_size": cache_size, **PIX})
    ranks.wait_done()
    status = request("status", socket)
    ranks.release()
    return ranks.records(), status


def test_two_jobs_on_one_dataset_fetch_about_one_jobs_bytes(daemon, many_plates, proxy, ranks, tmp_path):
    n = many_plates.spec.field_count
    solo = daemon(endpoint_url=proxy.url)
    alone = Ranks(tmp_path / "solo")
    (tmp_path / "solo").mkdir()
    try:
        run_two_rank_jobs(alone, solo.socket, many_plates, [29500], n // 3)
    finally:
        alone.kill()
    solo.stop()
    one_job = served_bytes(gets(proxy, ".tiff"), many_plates.manifest, many_plates.bucket)
    proxy.log.clear()

    d = daemon(endpoint_url=proxy.url)
    records, status = run_two_rank_jobs(ranks, d.socket, many_plates, [29500, 29501], n // 3)
    two_jobs = served_bytes(gets(proxy, ".tiff"), many_plates.manifest, many_plates.bucket)
    assert two_jobs <= 1.1 * one_job, f"two jobs fetched {two_jobs / one_job:.2f}× one job's bytes"
    assert status["fields_shared"] == sum(j["fields_shared"] for j in status["jobs"]) > 0
    for job in status["jobs"]:   # a copy is a fill: its first use is a miss, as after a GET
        assert job["fields_served"] == 2 * n and job["cache_misses"] <= job["fields_fetched"] + job["fields_shared"]
    assert len(gets(proxy, ".npy")) == 5 * len(many_plates.spec.plates)
    ids = [r["job"] for r in records]
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]   # ranks of a run share it, runs do not
    first = judge(records[:2], many_plates.spec, 2)
    second = judge(records[2:], many_plates.spec, 2)
    assert first == second   # bit-identical pixels, whichever job fetched a field


# ---------------------------------------------------------------------------------------------
# 4. Eight ranks


def test_eight_ranks_in_separate_processes_each_at_its_own_pace(daemon, many_plates, ranks):
    d = daemon()
    world = 8
    for rank in range(world):   # think times 0..35 ms: the fastest rank runs ahead of the slowest
        ranks.start(torchrun_env("eight", rank, world, 29600), dataset=many_plates.dataset, socket=str(d.socket),
                    batch_size=2, epochs=2, think_s=0.005 * rank, hold=True,
                    options={"cache_size": 48, "prefetch_factor": 1, **PIX})
    ranks.wait_done()
    status = request("status", d.socket)   # every rank still attached
    ranks.release()
    records = ranks.records()
    judge(records, many_plates.spec, 2)
    assert len({r["job"] for r in records}) == 1
    (job,) = status["jobs"]
    per_epoch = many_plates.spec.field_count // (world * 2)
    assert sorted(int(r) for r in job["ranks"]) == list(range(world))
    for rank, state in job["ranks"].items():
        assert state["batches"] == 2 * per_epoch and state["stall_s"] >= 0
    waits = {r["rank"]: max(b["waited_s"] for b in r["batches"]) for r in records}
    assert max(waits.values()) < 30, f"a rank waited {max(waits.values()):.1f} s for one batch: {waits}"
    assert abs(sum(s["stall_s"] for s in job["ranks"].values()) - job["stall_s"]) < 1e-6
