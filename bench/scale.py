"""Scale rehearsal: the real key layout at the counts users have, on one node.

    python -m bench.scale [--quick] [--markdown BENCHMARKS.md] [--workdir DIR]

Three parts, each against real processes (`prefetchd serve`, one process per trainer rank) and a loopback S3
(moto) behind `bench/latency_proxy.py`, which counts GETs and bytes per object kind (`.tiff` images, `.npy`
illumination files) — neutral counts, not the daemon's own:

1. **illumination**: 24 plates × 4 fields (2 batches), default preprocessing, a cache of a third of the dataset,
   one rank, one epoch: GETs and bytes per field against the ideal (5 TIFFs per field + 5 illumination files
   once per plate = 600 GETs).
2. **rehearsal**: ≥ 48 plates with illumination files over 2 batches, two identical concurrent jobs of 8 ranks
   each (separate processes, environments as torchrun sets them, no job id given), every rank asking at its
   own demand: GETs and bytes per served field against the ideal (the node's lower bound: offline MIN over all
   jobs' slots together × 5 TIFFs, plus the illumination files once per plate), hit rate per epoch against the offline bounds
   over the 8 ranks' interleaved order, stall per rank, daemon RSS and shared memory; every epoch of each
   job judged complete and disjoint across ranks, and both jobs' pixels of each field bit-identical.
3. **index**: a keys file of full cpg0000 size (110 plates × 3,456 sites × 8 channels ≈ 3.04M keys) through a
   cold index build, attach and the first batch, then a warm attach, against a loopback server that answers
   any key with a template object.

Images are small (5 × 256² by default) so that the whole run takes minutes on 2 cores; GETs per field do not
depend on the image size, bytes per field scale with it. The last line is
`gets_per_field=… ideal=… stall_max=…` (the rehearsal's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MARK_START, MARK_END = "<!-- bench.scale:start -->", "<!-- bench.scale:end -->"
STAINS = 5


@dataclass
class Plan:
    size: int = 256
    latency_ms: float = 10.0
    # 1. illumination
    illum_plates: int = 24
    illum_wells: int = 2
    illum_sites: int = 2
    # 2. rehearsal
    plates: int = 48
    batches: int = 2
    wells: int = 4
    sites: int = 2
    ranks: int = 8
    jobs: int = 2
    batch_size: int = 4
    epochs: int = 2
    cache_fraction: float = 1 / 3
    demand: tuple[float, ...] = (1.5, 1.5, 2.0, 2.0, 2.5, 2.5, 3.0, 3.0)   # fields/s of each rank
    # 3. index
    index_plates: int = 110
    parts: tuple[str, ...] = ("illum", "rehearsal", "index")


def quick_plan() -> Plan:
    return Plan(illum_plates=12, plates=48, wells=2, sites=1, epochs=2, index_plates=8)


# ---------------------------------------------------------------------------------------------
# One trainer rank (its own process)


def consume(args: dict) -> None:
    """Attach as one rank (job identity from the environment, as under torchrun), read `epochs` epochs at
    `demand` fields/s, write one JSON line per batch: ids, a digest of each field's pixels, the wait."""
    from prefetchd.client import attach

    pace = args["batch_size"] / args["demand"] if args["demand"] else 0.0
    with open(args["out"], "w") as out, attach(args["dataset"], batch_size=args["batch_size"], seed=args["seed"],
                                               rank=args["rank"], world_size=args["world_size"],
                                               socket=args["socket"], **args["options"]) as stream:
        out.write(json.dumps({"job": stream.job, "batches_per_epoch": stream.batches_per_epoch}) + "\n")
        next_at = time.monotonic()
        for epoch in range(args["epochs"]):
            for batch in stream.epoch(epoch):
                digests = [hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=12).hexdigest()
                           for img in batch.images]
                out.write(json.dumps({"epoch": epoch, "batch": batch.index, "ids": batch.ids, "digests": digests,
                                      "waited_s": batch.waited_s}) + "\n")
                next_at += pace
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)   # the rank's demand: it reads no faster than a training step allows
                else:
                    next_at = time.monotonic()
        out.flush()


def torchrun_env(run_id: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for a worker (torch/distributed/elastic/agent/server/local_elastic_agent.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFETCHD_JOB", "SLURM_JOB_ID", "SLURM_STEP_ID")}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID=run_id,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return env


def start_rank(workdir: Path, job: str, rank: int, world_size: int, port: int, run: dict) -> tuple[subprocess.Popen, Path]:
    out = workdir / f"{job}-rank{rank}.jsonl"
    args = {**run, "rank": rank, "world_size": world_size, "out": str(out)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--consume", json.dumps(args)], cwd=REPO_ROOT,
                            env=torchrun_env(job, rank, world_size, port), stderr=open(workdir / f"{out.stem}.err", "w"))
    return proc, out


def read_rank(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]


# ---------------------------------------------------------------------------------------------
# The world around the daemon


class Stage:
    """moto on loopback with the plates uploaded, the counting latency proxy, one `prefetchd serve`."""

    def __init__(self, workdir: Path, manifest, bucket: str, latency_ms: float, overrides: list[str] = ()):
        self.workdir, self.manifest, self.bucket = workdir, manifest, bucket
        self.latency_ms, self.overrides = latency_ms, list(overrides)

    def __enter__(self) -> "Stage":
        from bench.latency_proxy import LatencyProxy
        from prefetchd.dev import synth
        from prefetchd.dev.daemon_process import DaemonProcess
        from prefetchd.dev.locals3 import LocalS3

        self.s3 = LocalS3().start()
        synth.upload(self.manifest, self.s3.endpoint_url, self.bucket)
        self.proxy = LatencyProxy(self.s3.endpoint_url, self.latency_ms).start()
        self.run = Path(tempfile.mkdtemp(prefix="pfd-scale-", dir="/tmp"))   # the socket and index cache
        self.socket = self.run / "p.sock"
        self.daemon = DaemonProcess(self.socket, [f"s3.endpoint_url={self.proxy.endpoint_url}",
                                                  f"cache_dir={self.run / 'cache'}", "s3.verify_md5=false",
                                                  *self.overrides], log_path=self.workdir / "daemon.log").start()
        return self

    @property
    def dataset(self) -> str:
        return f"JUMPS3MultiView:bucket={self.bucket}:prefix={self.manifest.spec.prefix}"

    def counts(self) -> dict[str, dict[str, int]]:
        stats = self.proxy.stats()
        return {f".{kind}": {what: stats.get(f"{kind}_{what}", 0) for what in ("requests", "bytes_down")}
                for kind in ("tiff", "npy")}

    def __exit__(self, *exc) -> None:
        self.daemon.stop()
        self.proxy.stop()
        self.s3.stop()
        shutil.rmtree(self.run, ignore_errors=True)


def run_jobs(stage: Stage, jobs: list[str], world_size: int, run: dict, demand: tuple[float, ...],
             timeout_s: float = 900.0) -> dict[str, Any]:
    """Start every rank of every job at once, poll the daemon's status until all exit, return what they
    received, the last status of each job (stall per rank), peak RSS and shared memory."""
    import psutil

    from prefetchd.control import request

    procs = []
    for j, job in enumerate(jobs):
        for rank in range(world_size):
            procs.append(start_rank(stage.workdir, job, rank, world_size, 29500 + j,
                                    {**run, "demand": demand[rank % len(demand)]}))
    daemon = psutil.Process(stage.daemon.proc.pid)
    peak_rss = peak_shm = 0
    last: dict[str, dict] = {}
    started = time.monotonic()
    while any(p.poll() is None for p, _ in procs):
        if time.monotonic() - started > timeout_s:
            for p, _ in procs:
                p.kill()
            raise RuntimeError(f"ranks still running after {timeout_s:.0f} s; see {stage.workdir}")
        status = request("status", stage.socket)
        for j in status["jobs"]:
            last[j["job"]] = j
        peak_rss = max(peak_rss, daemon.memory_info().rss)
        peak_shm = max(peak_shm, status["shm_bytes"])
        time.sleep(0.5)   # sampling interval of the status poll
    failed = [(out, p.returncode) for p, out in procs if p.returncode != 0]
    if failed:
        raise RuntimeError(f"ranks failed: {failed}; stderr beside them in {stage.workdir}")
    received: dict[str, dict[int, list[dict]]] = {}
    ids_of: dict[str, str] = {}
    for (p, out), spec in zip(procs, [(job, r) for job in jobs for r in range(world_size)]):
        head, batches = read_rank(out)
        received.setdefault(spec[0], {})[spec[1]] = batches
        ids_of[spec[0]] = head["job"]
    return {"received": received, "job_ids": ids_of, "status": request("status", stage.socket), "last": last,
            "peak_rss": peak_rss, "peak_shm": peak_shm, "seconds": time.monotonic() - started}


def judge(received: dict[str, dict[int, list[dict]]], all_ids: set[str], epochs: int) -> dict[str, Any]:
    """Per job and epoch: every field exactly once over the ranks, counted both by the ids in the replies and by
    the pixels received (as many distinct digests as fields); across jobs: the same pixels per field."""
    problems: list[str] = []
    digest_of: dict[str, str] = {}
    for job, ranks in received.items():
        for e in range(epochs):
            got = [(i, d) for batches in ranks.values() for b in batches if b["epoch"] == e
                   for i, d in zip(b["ids"], b["digests"])]
            ids, pixels = sorted(i for i, _ in got), {d for _, d in got}
            if ids != sorted(all_ids) or len(pixels) != len(all_ids):
                problems.append(f"{job} epoch {e}: {len(got)} fields, {len(set(ids))} distinct ids and "
                                f"{len(pixels)} distinct pixels of {len(all_ids)}")
        for batches in ranks.values():
            for b in batches:
                for i, d in zip(b["ids"], b["digests"]):
                    if digest_of.setdefault(i, d) != d:
                        problems.append(f"{i}: different pixels in two deliveries")
    return {"problems": problems[:10], "ok": not problems}


# ---------------------------------------------------------------------------------------------
# Parts


def part_illum(plan: Plan, workdir: Path, log) -> dict[str, Any]:
    from bench.scale_data import ensure_plates
    from prefetchd.dev.synth import many_plates_spec

    spec = many_plates_spec(plan.illum_plates, 2, plan.illum_wells, plan.illum_sites, plan.size)
    manifest = ensure_plates(workdir, spec)
    n = spec.field_count
    cache = max(plan.batch_size * 3, round(n * plan.cache_fraction))
    run = {"dataset": "", "batch_size": plan.batch_size, "seed": 0, "epochs": 1, "socket": "",
           "options": {"cache_size": cache}}
    part_dir = workdir / "illum"
    part_dir.mkdir(exist_ok=True)
    with Stage(part_dir, manifest, f"scale-illum-{n}", plan.latency_ms) as stage:
        run.update(dataset=stage.dataset, socket=str(stage.socket))
        out = run_jobs(stage, ["illum"], 1, run, (0.0,))
        counts = stage.counts()
    verdict = judge(out["received"], {f.id for f in manifest.fields}, 1)
    ideal = STAINS * n + STAINS * len(spec.plates)
    gets = counts[".tiff"]["requests"] + counts[".npy"]["requests"]
    result = {"plates": len(spec.plates), "fields": n, "cache_size": cache, "gets": gets, "ideal_gets": ideal,
              "tiff_gets": counts[".tiff"]["requests"], "npy_gets": counts[".npy"]["requests"],
              "bytes": counts[".tiff"]["bytes_down"] + counts[".npy"]["bytes_down"],
              "npy_bytes": counts[".npy"]["bytes_down"], "field_bytes": field_bytes(manifest),
              "ideal_bytes": ideal_bytes(manifest, n), "judged": verdict}
    log(f"illumination: {n} fields on {len(spec.plates)} plates, cache {cache}: {gets} GETs "
        f"({result['tiff_gets']} TIFF + {result['npy_gets']} illum) vs ideal {ideal}; "
        f"{gets / n:.2f} GETs and {result['bytes'] / n / 1e6:.3f} MB per field vs {ideal / n:.2f} and "
        f"{result['ideal_bytes'] / n / 1e6:.3f}; delivery {'ok' if verdict['ok'] else verdict['problems']}")
    return result


def field_bytes(manifest) -> int:
    """Bytes of one field's TIFFs (the first field; synthetic fields are all the same size)."""
    return sum((manifest.root / k).stat().st_size for k in manifest.fields[0].keys.values())


def illum_bytes(manifest) -> int:
    return sum((manifest.root / k).stat().st_size for stains in manifest.illum_keys.values() for k in stains.values())


def ideal_bytes(manifest, fetches: int) -> int:
    return fetches * field_bytes(manifest) + illum_bytes(manifest)


def rank_order(n: int, seed: int, epoch: int, world_size: int, batch_size: int) -> np.ndarray:
    """The node's access order when every rank advances at the same pace: batch k of every rank, in turn."""
    from prefetchd.schedule import schedule

    orders = [schedule(n, seed, epoch, r, world_size, batch_size, False) for r in range(world_size)]
    steps = max(len(o) for o in orders) // batch_size
    return np.concatenate([o[k * batch_size:(k + 1) * batch_size] for k in range(steps) for o in orders])


def part_rehearsal(plan: Plan, workdir: Path, log) -> dict[str, Any]:
    from bench.scale_data import ensure_plates
    from prefetchd.bounds import simulate
    from prefetchd.dev.synth import many_plates_spec
    from prefetchd.policy import Policy

    spec = many_plates_spec(plan.plates, plan.batches, plan.wells, plan.sites, plan.size)
    manifest = ensure_plates(workdir, spec)
    n = spec.field_count
    floor = 3 * plan.batch_size * plan.ranks   # (prefetch_factor + 1) × batch × local ranks
    cache = max(floor, round(n * plan.cache_fraction))
    run = {"dataset": "", "batch_size": plan.batch_size, "seed": 0, "epochs": plan.epochs, "socket": "",
           "options": {"cache_size": cache}}
    part_dir = workdir / "rehearsal"
    part_dir.mkdir(exist_ok=True)
    jobs = [f"run{j}" for j in range(plan.jobs)]
    with Stage(part_dir, manifest, f"scale-{n}", plan.latency_ms) as stage:
        run.update(dataset=stage.dataset, socket=str(stage.socket))
        log(f"rehearsal: {len(jobs)} jobs × {plan.ranks} ranks on {n} fields ({len(spec.plates)} plates, "
            f"{len(spec.batches)} batches), cache {cache} per job, {plan.epochs} epochs ...")
        out = run_jobs(stage, jobs, plan.ranks, run, plan.demand)
        counts = stage.counts()
    verdict = judge(out["received"], {f.id for f in manifest.fields}, plan.epochs)
    per_epoch = [rank_order(n, 0, e, plan.ranks, plan.batch_size) for e in range(plan.epochs)]
    bounds = {p.value: simulate(per_epoch, cache, p) for p in (Policy.BELADY, Policy.LRU)}
    job_min = misses(per_epoch, bounds["belady"])
    # The node's lower bound: every fetched field sits in some job's slot, so no node can miss less than
    # offline MIN with all jobs' slots together.
    node_min = misses(per_epoch, simulate(per_epoch, cache * len(jobs), Policy.BELADY))
    served = sum(len(b["ids"]) for ranks in out["received"].values() for batches in ranks.values() for b in batches)
    gets = counts[".tiff"]["requests"] + counts[".npy"]["requests"]
    nbytes = counts[".tiff"]["bytes_down"] + counts[".npy"]["bytes_down"]
    ideal_gets = STAINS * node_min + STAINS * len(spec.plates)
    stalls = {f"{job}/{r}": v["stall_s"] for job, st in out["last"].items() for r, v in st["ranks"].items()}
    hit = {job: [round(e["hit_rate"], 3) for e in st["epochs"].values()] for job, st in out["last"].items()}
    status = out["status"]
    result = {
        "plates": len(spec.plates), "batches": len(spec.batches), "fields": n, "cache_size": cache,
        "jobs": len(jobs), "ranks": plan.ranks, "epochs": plan.epochs, "demand": list(plan.demand),
        "served": served, "gets": gets, "tiff_gets": counts[".tiff"]["requests"], "npy_gets": counts[".npy"]["requests"],
        "bytes": nbytes, "npy_bytes": counts[".npy"]["bytes_down"], "ideal_gets": ideal_gets,
        "ideal_bytes": ideal_bytes(manifest, node_min), "one_job_min_gets": STAINS * (job_min + len(spec.plates)),
        "one_job_min_bytes": ideal_bytes(manifest, job_min),
        "gets_per_field": gets / served, "ideal_per_field": ideal_gets / served,
        "hit_rate": hit, "bounds": bounds, "stall_s": stalls, "stall_max": max(stalls.values(), default=0.0),
        "fields_shared": status.get("fields_shared", 0), "illum": status.get("illum"),
        "peak_rss_mb": out["peak_rss"] / 1e6, "peak_shm_mb": out["peak_shm"] / 1e6, "seconds": out["seconds"],
        "job_ids": out["job_ids"], "judged": verdict,
    }
    log(f"  served {served} fields in {out['seconds']:.0f} s; {gets} GETs ({result['tiff_gets']} TIFF + "
        f"{result['npy_gets']} illum), {nbytes / 1e6:.1f} MB; ideal {ideal_gets} GETs, "
        f"{result['ideal_bytes'] / 1e6:.1f} MB (offline MIN over both jobs' slots + illumination once); one job "
        f"alone at its MIN: {result['one_job_min_gets']} GETs, {result['one_job_min_bytes'] / 1e6:.1f} MB")
    log(f"  hit rate per job and epoch {hit}; offline bounds belady {fmt_rates(bounds['belady'])}, "
        f"lru {fmt_rates(bounds['lru'])}; fields copied between jobs {result['fields_shared']}")
    log(f"  stall per rank: " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(stalls.items())))
    log(f"  daemon peak RSS {result['peak_rss_mb']:.0f} MB, shared memory {result['peak_shm_mb']:.0f} MB; "
        f"job ids {sorted(set(out['job_ids'].values()))}; delivery {'ok' if verdict['ok'] else verdict['problems']}")
    return result


def misses(per_epoch: list[np.ndarray], hit_rates: list[float]) -> int:
    return sum(round(len(seq) * (1 - hr)) for seq, hr in zip(per_epoch, hit_rates))


def fmt_rates(rates: list[float]) -> str:
    return "/".join(f"{r:.0%}" for r in rates)


def part_index(plan: Plan, workdir: Path, log) -> dict[str, Any]:
    import psutil

    from bench.scale_data import CPG0000_PREFIX, AnyKeyServer, template_objects, write_cpg0000_keys
    from prefetchd.client import attach
    from prefetchd.dev.daemon_process import DaemonProcess

    part_dir = workdir / "index"
    part_dir.mkdir(exist_ok=True)
    tiff, npy = template_objects(plan.size)
    keys = part_dir / f"keys-{plan.index_plates}p-{len(tiff)}.txt"
    started = time.monotonic()
    if not keys.exists():
        write_cpg0000_keys(keys.with_suffix(".tmp"), plan.index_plates, len(tiff))
        keys.with_suffix(".tmp").rename(keys)
    lines = sum(1 for _ in open(keys))
    log(f"index: keys file of {lines:,} keys ({keys.stat().st_size / 1e6:.0f} MB) ready in "
        f"{time.monotonic() - started:.1f} s")
    dataset = f"JUMPS3MultiView:bucket=cellpainting-gallery:prefix={CPG0000_PREFIX}:index={keys}"
    result: dict[str, Any] = {"keys": lines}
    with AnyKeyServer(tiff, npy) as server, tempfile.TemporaryDirectory(prefix="pfd-scale-", dir="/tmp") as tmp:
        run = Path(tmp)   # the socket and the index cache both phases share
        for phase in ("cold", "warm"):   # warm: a restarted daemon reads the index from its on-disk cache
            with DaemonProcess(run / "p.sock", [f"s3.endpoint_url={server.endpoint_url}", f"cache_dir={run / 'cache'}",
                                                "s3.verify_md5=false", "index.wait_s=1800"],
                               log_path=part_dir / "daemon.log") as daemon:
                t0 = time.monotonic()
                with attach(dataset, batch_size=plan.batch_size, socket=daemon.socket, job=f"index-{phase}",
                            cache_size=4 * plan.batch_size, timeout=1800) as stream:
                    t1 = time.monotonic()
                    first = stream.next(0, 0)
                    t2 = time.monotonic()
                    result[phase] = {"attach_s": t1 - t0, "first_batch_s": t2 - t1, "fields": stream.fields,
                                     "shape": list(first.images.shape)}
                result[phase]["rss_mb"] = psutil.Process(daemon.proc.pid).memory_info().rss / 1e6
            log(f"  {phase}: attach {result[phase]['attach_s']:.1f} s ({result[phase]['fields']:,} fields), first "
                f"batch {result[phase]['first_batch_s']:.2f} s later; daemon RSS {result[phase]['rss_mb']:.0f} MB")
    return result


# ---------------------------------------------------------------------------------------------
# Report


def markdown_section(results: dict, command: str) -> str:
    lines = [MARK_START, "## Scale rehearsal (many plates, 8 ranks, two jobs, cpg0000-size index)", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in "
             f"{results['total_s']:.0f} s on this shared 2-core machine; every figure below comes from that run. "
             f"Images 5 × {results['plan']['size']}² uint16 (small so it runs in minutes: GETs per field do not "
             "depend on image size, bytes do); GETs and bytes counted by `bench/latency_proxy.py` "
             f"({results['plan']['latency_ms']:g} ms per GET) in front of moto, split by object kind.", ""]
    il = results.get("illum")
    if il:
        n = il["fields"]
        lines += [f"**Illumination once** ({il['plates']} plates × {n // il['plates']} fields, 2 batches, default "
                  f"preprocessing, cache {il['cache_size']} fields = a third, 1 rank, 1 epoch):", "",
                  "| | GETs | TIFF | illum | GETs/field | MB/field |", "|---|---|---|---|---|---|",
                  f"| measured | {il['gets']} | {il['tiff_gets']} | {il['npy_gets']} | {il['gets'] / n:.2f} | "
                  f"{il['bytes'] / n / 1e6:.3f} |",
                  f"| ideal | {il['ideal_gets']} | {n * STAINS} | {il['plates'] * STAINS} | {il['ideal_gets'] / n:.2f} | "
                  f"{il['ideal_bytes'] / n / 1e6:.3f} |", ""]
    r = results.get("rehearsal")
    if r:
        lines += [f"**Rehearsal**: {r['plates']} plates over {r['batches']} batches ({r['fields']} fields), "
                  f"{r['jobs']} identical jobs started together, {r['ranks']} ranks each (one process per rank, "
                  f"torchrun's environment, no job id given), demand per rank {', '.join(f'{d:g}' for d in r['demand'])} "
                  f"fields/s, cache {r['cache_size']} fields per job, {r['epochs']} epochs. Ideal = the node's lower "
                  "bound: offline MIN over both jobs' slots together (every fetched field sits in some job's slot) × "
                  "5 TIFFs + every plate's 5 illumination files once; for scale, one job alone at its own MIN "
                  f"would make {r['one_job_min_gets']} GETs ({r['one_job_min_bytes'] / 1e6:.1f} MB).", "",
                  "| served | GETs | TIFF | illum | MB | ideal GETs | ideal MB | GETs/field | ideal/field | fields copied between jobs |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {r['served']} | {r['gets']} | {r['tiff_gets']} | {r['npy_gets']} | {r['bytes'] / 1e6:.1f} | "
                  f"{r['ideal_gets']} | {r['ideal_bytes'] / 1e6:.1f} | {r['gets_per_field']:.2f} | "
                  f"{r['ideal_per_field']:.2f} | {r['fields_shared']} |", "",
                  "| job | hit rate per epoch | offline MIN | offline LRU |", "|---|---|---|---|"]
        for job, rates in r["hit_rate"].items():
            lines.append(f"| {job} | {fmt_rates(rates)} | {fmt_rates(r['bounds']['belady'])} | "
                         f"{fmt_rates(r['bounds']['lru'])} |")
        lines += ["", "A job's hit rate can beat its own offline MIN: fields the other job fetched arrive by copy. "
                  "Stall per rank (s, `next()` waits summed over the run, the first batch included):", "",
                  "| job | " + " | ".join(f"rank {i}" for i in range(r["ranks"])) + " |",
                  "|---" * (r["ranks"] + 1) + "|"]
        for job in sorted(r["hit_rate"]):
            lines.append(f"| {job} | " + " | ".join(f"{r['stall_s'].get(f'{job}/{i}', float('nan')):.2f}"
                                                     for i in range(r["ranks"])) + " |")
        lines += ["",
                  f"Daemon peak RSS {r['peak_rss_mb']:.0f} MB, shared memory {r['peak_shm_mb']:.0f} MB; delivery "
                  f"judged from what the ranks received: {'every epoch complete and disjoint, pixels identical across jobs' if r['judged']['ok'] else r['judged']['problems']}.", ""]
    ix = results.get("index")
    if ix:
        lines += [f"**Index at cpg0000 size**: a keys file of {ix['keys']:,} keys → attach → first batch, against a "
                  "loopback server that answers any key with a template object; cold = a fresh daemon builds the "
                  "index, warm = a restarted daemon reads it from its on-disk cache:", "",
                  "| | attach s | first batch s | fields | daemon RSS MB |", "|---|---|---|---|---|"]
        for phase in ("cold", "warm"):
            p = ix[phase]
            lines.append(f"| {phase} | {p['attach_s']:.1f} | {p['first_batch_s']:.2f} | {p['fields']:,} | {p['rss_mb']:.0f} |")
        lines.append("")
    lines += [f"`{results['last_line']}`", MARK_END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    from bench.sections import write_section as write

    write(path, section, MARK_START, MARK_END)


def carry_section(path: Path, text: str) -> str:
    """For bench.compare, which rewrites BENCHMARKS.md: this benchmark's section put back."""
    from bench.sections import carry_section as carry

    return carry(path, text, MARK_START, MARK_END)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer fields per plate and a small index (smoke test)")
    ap.add_argument("--parts", default=None, help="comma list of illum,rehearsal,index (default all)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prefetchd-scale"))
    ap.add_argument("--markdown", help="write this benchmark's section into this file (e.g. BENCHMARKS.md)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--consume", help=argparse.SUPPRESS)   # one rank's process
    a = ap.parse_args(argv)
    if a.consume:
        consume(json.loads(a.consume))
        return 0
    plan = quick_plan() if a.quick else Plan()
    if a.parts:
        plan.parts = tuple(a.parts.split(","))
    if a.size:
        plan.size = a.size
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.scale" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    started = time.monotonic()
    log = lambda msg: print(msg, flush=True)   # noqa: E731
    results: dict[str, Any] = {"plan": asdict(plan), "command": command}
    parts = {"illum": part_illum, "rehearsal": part_rehearsal, "index": part_index}
    for name in plan.parts:
        results[name] = parts[name](plan, workdir, log)
    results["total_s"] = time.monotonic() - started
    r = results.get("rehearsal") or {}
    results["last_line"] = (f"gets_per_field={r.get('gets_per_field', float('nan')):.2f} "
                            f"ideal={r.get('ideal_per_field', float('nan')):.2f} stall_max={r.get('stall_max', float('nan')):.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    if a.markdown:
        write_section(Path(a.markdown), markdown_section(results, command))
    print(results["last_line"])
    return 0 if all((results.get(p) or {}).get("judged", {"ok": True})["ok"] for p in ("illum", "rehearsal")) else 1


if __name__ == "__main__":
    sys.exit(main())
