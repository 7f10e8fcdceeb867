"""prefetchd vs the JUMP guide's DataLoader design, side by side in one run, against a real S3 server.

    python -m bench.compare --quick          # < 5 min on 2 cores; last line: ratio_vs_seed=<x>
    python -m bench.compare                  # full: writes BENCHMARKS.md and docs/img/bench_*.png

Path: synthetic plates (prefetchd.dev.synth, real key names, 5 × H × W uint16 TIFF) → SeaweedFS S3 on loopback
(bench/servers.py) → latency/bandwidth proxy (bench/latency_proxy.py, own process) → each system.
Every system run is its own subprocess (`--run-one`), so the resident memory of its whole process tree
(DataLoader workers, or daemon + consumer) is sampled cleanly and its CPU comes from wait4 rusage.

Systems:
  baseline-u16     DataLoader(8 workers, prefetch 2), boto3 unsigned per worker, LRU 1,000 images per worker,
                   cv2.imdecode(IMREAD_UNCHANGED) + OpenCV uint16 CLAHE (clip 3, 8×8)        [16-bit]
  baseline-guide   the guide as written: cv2.imdecode default flag (8-bit) + 8-bit CLAHE     [8-bit!]
  s3torch-u16      s3torchconnector S3MapDataset (CRT client) in the same DataLoader, 16-bit path
  prefetchd-opencv prefetchd, OpenCV-compatible: illum off, rescale off, CLAHE bins 65536   [16-bit, like for like]
  prefetchd        prefetchd defaults: illum on, rescale 0.1/99.9, CLAHE 256 bins             [16-bit]

Consumers: bench/consumer.py (drains batches as fast as possible, or at a demand = a simulated GPU step), and the
real trainer (bench/trainer_consumer.py: trainer.train's own loop and DINO step, vit_pico on small crops, fed by a
prefetchd daemon or by the baseline DataLoader; section "trainer").

    python -m bench.compare --only trainer   # one section only (development); see --help for the section names
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.accounting import TreeSampler, busy_cpu, machine_info, proc_cpu, summarize_profile
from bench.figures import LIKE_FOR_LIKE, fps, per_field, ratio_vs_seed
from bench.runs import prefetchd_options, run_one
from prefetchd.bounds import bounds_for

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("baseline-u16", "baseline-guide", "s3torch-u16", "prefetchd-opencv", "prefetchd")
SECTIONS = ("fits", "large", "small", "stall", "trainer", "policy", "latency", "profile")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Plan:
    fields: int = 96               # full dataset; the "fits" regime uses the first batch (half of it)
    size: int = 1080
    small_size: int = 270
    batch_size: int = 8
    epochs: int = 2
    fits_cache: int = 64           # prefetchd slots in the "fits" regime (≥ half the fields)
    large_cache: int = 24          # prefetchd slots in the "large" regime (N / C = 4)
    latency_ms: float = 30.0
    conn_mbps: float = 0.0
    total_mbps: float = 0.0
    demand: float = 6.0            # fields/s for the stall runs
    stall_cap_ratio: float = 1.1   # stall runs again behind a total bandwidth cap of this × the demand's MB/s
    systems: tuple[str, ...] = SYSTEMS
    stall_systems: tuple[str, ...] = LIKE_FOR_LIKE
    latency_sweep: tuple[float, ...] = ()
    cache_sweep: bool = False
    small_variant: bool = True
    profile: bool = True
    regimes: tuple[str, ...] = ("fits", "large")
    trainer_systems: tuple[str, ...] = LIKE_FOR_LIKE  # the real trainer as consumer (large regime dataset)
    trainer_epochs: int = 1
    repeats: int = 1               # fits/large: interleaved runs per system, the best counts (noise is one-sided)


def quick_plan() -> Plan:
    return Plan(fields=48, epochs=2, fits_cache=32, large_cache=12, batch_size=4, small_variant=False, profile=False,
                systems=("baseline-u16", "baseline-guide", "prefetchd-opencv", "prefetchd"))


def full_plan() -> Plan:
    return Plan(fields=96, epochs=3, fits_cache=64, large_cache=24, batch_size=8,
                latency_sweep=(0.0, 30.0, 100.0), cache_sweep=True, trainer_epochs=2, repeats=2)


# ---------------------------------------------------------------------------------------------
# Data


def bucket_for(spec) -> str:
    return f"bench-{spec.field_count}x{spec.height}"


def spec_for(fields: int, size: int):
    from prefetchd.dev import synth

    return synth.demo_spec(fields=fields, size=size)


def ensure_plates(data_root: Path, fields: int, size: int):
    """Write the synthetic plates once per (fields, size); later runs reuse them."""
    from prefetchd.dev import synth

    spec = spec_for(fields, size)
    root = data_root / f"plates-{spec.field_count}x{size}"
    manifest = synth.build_manifest(spec, root)
    if not (root / "manifest.json").exists():
        synth.write_plates(root, spec, workers=2)
    return spec, manifest


def already_uploaded(endpoint: str, bucket: str, manifest) -> bool:
    from prefetchd.dev.locals3 import admin_client

    client = admin_client(endpoint)
    try:
        keys = manifest.all_keys
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            client.head_object(Bucket=bucket, Key=key)
        return True
    except Exception:
        return False


def dataset_fields(manifest, batch: str | None) -> list[tuple[str, list[str]]]:
    """(field id, channel keys in prefetchd's default channel order DNA, ER, RNA, AGP, Mito)."""
    order = (5, 4, 3, 2, 1)
    return [(f.id, [f.keys[c] for c in order]) for f in manifest.fields if batch is None or f.batch == batch]


# ---------------------------------------------------------------------------------------------
# Orchestration (parent)


def spawn_run(job: dict, timeout: float) -> dict:
    """Run one system in a subprocess; sample its tree's memory; CPU from wait4 rusage."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    jpath = Path(job["workdir"]) / f"job-{job['system']}-{job['regime']}-{time.monotonic_ns()}.json"
    jpath.write_text(json.dumps(job))
    opath = jpath.with_suffix(".out.json")
    import psutil

    busy0 = busy_cpu(psutil.cpu_times())
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.compare", "--run-one", str(jpath), "--out-json", str(opath)],
                            env=env, cwd=ROOT)
    with TreeSampler(proc.pid) as sampler:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not opath.exists():
        return {"system": job["system"], "error": f"exit {proc.returncode}", "wall_s": wall}
    out = json.loads(opath.read_text())
    out["memory"] = sampler.peak()
    out["memory_timeline"] = sampler.samples
    out["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    out["machine_busy_s"] = busy_cpu(psutil.cpu_times()) - busy0  # every process on the machine, for "other CPU"
    out["wall_s"] = wall
    return out


def stage_costs_prefetchd(manifest, root: Path, opts: dict, repeat: int = 3, md5: bool = True) -> dict:
    """Thread-CPU ms per field of the daemon's decode-side stages, run in this process on one field:
    TIFF decode ×C, illum ×C, rescale ×C, CLAHE ×C (with `opts`), copy into a slot."""
    from prefetchd.decode import decode_tiff
    from prefetchd.preprocess import Preprocessing
    from prefetchd.preprocess.clahe import clahe, rescale
    from prefetchd.preprocess.pipeline import illum_correct

    pre = Preprocessing.from_options(**{k: v for k, v in opts.items() if k in ("illum", "rescale", "clahe")})
    f = manifest.fields[0]
    blobs = [(root / f.keys[c]).read_bytes() for c in (5, 4, 3, 2, 1)]
    illum = np.load(next(iter(p for p in root.rglob("*_IllumDNA.npy")))) if pre.illum else None
    best: dict[str, float] = {}
    for _ in range(repeat):
        t = {"md5": 0.0, "decode": 0.0, "illum": 0.0, "rescale": 0.0, "clahe": 0.0, "copy": 0.0}
        t0 = time.thread_time()
        for b in blobs if md5 else ():  # S3Store checks bodies against their MD5 ETag when s3.verify_md5 is on
            hashlib.md5(b).hexdigest()
        t["md5"] = time.thread_time() - t0
        slot = np.empty((len(blobs), *decode_tiff(blobs[0]).shape), np.uint16)
        for c, b in enumerate(blobs):
            t0 = time.thread_time()
            img = decode_tiff(b)
            t1 = time.thread_time()
            if illum is not None:
                img = illum_correct(img, illum)
            t2 = time.thread_time()
            if pre.rescale is not None:
                img = rescale(img, pre.rescale.low, pre.rescale.high)
            t3 = time.thread_time()
            if pre.daemon_clahe is not None:
                cl = pre.daemon_clahe
                img = clahe(img, cl.clip_limit, cl.tile_grid, cl.bins)
            t4 = time.thread_time()
            slot[c] = img
            t5 = time.thread_time()
            for k, v in zip(("decode", "illum", "rescale", "clahe", "copy"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[k] += v
        best = t if not best else {k: min(best[k], t[k]) for k in t}
    return {k: v * 1e3 for k, v in best.items()}


def run_job(job: dict, ctx: dict, timeout: float = 600) -> dict:
    """spawn_run plus the S3 server's and the proxy's CPU during the run and the machine's other load."""
    s0, p0 = proc_cpu(ctx["server"].proc.pid), proc_cpu(ctx["proxy"].pid)
    run = spawn_run(job, timeout=timeout)
    run["server_cpu_s"] = proc_cpu(ctx["server"].proc.pid) - s0
    run["proxy_cpu_s"] = proc_cpu(ctx["proxy"].pid) - p0
    # CPU used by processes outside this benchmark (e.g. other jobs on the machine) during the run
    run["other_cpu_s"] = max(0.0, run.get("machine_busy_s", 0.0) - run.get("process_cpu_s", 0.0)
                             - run["server_cpu_s"] - run["proxy_cpu_s"])
    return run


def regime_job(name: str, plan: Plan, ctx: dict, system: str, variant: str = "full") -> dict:
    spec, manifest = ctx["data"][variant]
    batch = next(iter(spec.batches)) if name == "fits" else None
    return {"system": system, "regime": name, "fields": dataset_fields(manifest, batch), "bucket": bucket_for(spec),
            "prefix": spec.prefix + (f"/{batch}" if batch else ""),
            "endpoint": ctx["proxy"].endpoint_url, "proxy_stats": ctx["proxy"].stats_port,
            "batch_size": plan.batch_size, "epochs": plan.epochs, "seed": 0,
            "cache_size": plan.fits_cache if name == "fits" else plan.large_cache,
            "workdir": str(ctx["work"]), "demand": None, "profile": False,
            "overrides": [f"s3.verify_md5={ctx['verify_md5']}"]}


def field_megabytes(manifest) -> float:
    """Mean bytes of one field's channel objects (MB = 10^6 B), from the local copy of the plates."""
    sizes = [sum((manifest.root / k).stat().st_size for k in f.keys.values()) for f in manifest.fields]
    return float(np.mean(sizes)) / 1e6


def run_regime(name: str, plan: Plan, ctx: dict, systems, *, demand=None, epochs=None, variant="full",
               extra: dict | None = None, log=print, repeats: int = 1) -> dict:
    """Each system once, in order; with `repeats` > 1 the whole order again, and each system keeps its
    fastest run (a shared machine only ever slows a run down), all fields/s listed in `repeat_fps`."""
    results: dict[str, dict] = {}
    for _ in range(max(1, repeats)):
        for system in systems:
            run = _one_run(name, plan, ctx, system, demand, epochs, variant, extra, log)
            best = results.get(system)
            fps_all = (best or {}).get("repeat_fps", []) + [fps(run) if "error" not in run else 0.0]
            if best is None or ("error" not in run and ("error" in best or fps(run) > fps(best))):
                results[system] = best = run
            best["repeat_fps"] = fps_all
    return results


def _one_run(name, plan, ctx, system, demand, epochs, variant, extra, log) -> dict:
    job = regime_job(name, plan, ctx, system, variant)
    job.update(epochs=epochs or plan.epochs, demand=demand,
               warm=demand is None and not (extra or {}).get("profile"))
    job.update(extra or {})
    fields, cache = job["fields"], job["cache_size"]
    run = run_job(job, ctx)
    run.update(regime=name, n_fields=len(fields), cache_size=cache, variant=variant, demand=demand)
    if "error" in run:
        log(f"  {name:5s} {system:17s} FAILED: {run['error']}")
    else:
        log(f"  {name:5s} {system:17s} {fps(run):6.2f} fields/s  stall {np.mean([e['stall_share'] for e in run['epochs']]):5.1%}"
            f" (after 1st batch {np.mean([e.get('steady_stall_share', 0.0) for e in run['epochs']]):5.1%})"
            f"  cpu {per_field(run) * 1e3:6.0f} ms/field  hit/epoch "
            + " ".join(f"{e['hit_rate']:.0%}" for e in run["epochs"])
            + f"  rss {run['memory']['rss_peak'] / 2**30:.2f} GiB  other-load {run['other_cpu_s'] / run['wall_s']:.2f} cores")
    return run


def run_trainer_section(plan: Plan, ctx: dict, log=print) -> dict:
    """The real trainer (bench/trainer_consumer.py) consuming the large-regime dataset, fed by each system."""
    results = {}
    for system in plan.trainer_systems:
        job = regime_job("large", plan, ctx, system)
        job.update(regime="trainer", consumer="trainer", trainer_epochs=plan.trainer_epochs, epochs=plan.trainer_epochs)
        run = run_job(job, ctx)
        run.update(regime="trainer", n_fields=len(job["fields"]), cache_size=job["cache_size"], variant="full")
        results[system] = run
        if "error" in run or not run.get("steps"):
            log(f"  train {system:17s} FAILED: {run.get('error', 'no steps logged')}")
            continue
        n = max(1, run["samples"])
        log(f"  train {system:17s} {run['steps']} steps  {run['steps_per_s']:5.2f} steps/s  "
            f"{run['samples_per_s']:6.2f} samples/s  data-wait {run['data_wait_share']:5.1%} "
            f"(after 1st step {run['steady_data_wait_share']:5.1%})  cpu {run['tree_cpu_s'] / n * 1e3:4.0f} ms/sample "
            f"(trainer {run['trainer_cpu_s'] / n * 1e3:.0f} + loader {run['loader_cpu_s'] / n * 1e3:.0f})  "
            f"rss {run['memory']['rss_peak'] / 2**30:.2f} GiB  loss {run['first_loss']:.2f}→{run['final_loss']:.2f}  "
            f"other-load {run['other_cpu_s'] / run['wall_s']:.2f} cores")
    return results


def apply_only(plan: Plan, only: str) -> set[str]:
    """Keep only the named sections of the plan (comma list out of SECTIONS)."""
    keep = {s.strip() for s in only.split(",") if s.strip()}
    unknown = keep - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    plan.regimes = tuple(r for r in plan.regimes if r in keep)
    plan.small_variant = plan.small_variant and "small" in keep
    if "stall" not in keep:
        plan.stall_systems = ()
    if "trainer" not in keep:
        plan.trainer_systems = ()
    plan.cache_sweep = plan.cache_sweep and "policy" in keep
    if "latency" not in keep:
        plan.latency_sweep = ()
    plan.profile = plan.profile and "profile" in keep
    return keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run, < 5 min on 2 cores")
    ap.add_argument("--server", default="seaweedfs", choices=("seaweedfs", "rclone"))
    ap.add_argument("--latency-ms", type=float, default=None)
    ap.add_argument("--conn-mbps", type=float, default=None)
    ap.add_argument("--total-mbps", type=float, default=None)
    ap.add_argument("--fields", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--systems", default=None, help="comma list out of " + ",".join(SYSTEMS))
    ap.add_argument("--only", default=None, metavar="SECTIONS",
                    help="run only these sections (comma list out of " + ",".join(SECTIONS) + "; e.g. "
                         "`--only trainer` = the real DINO trainer fed by prefetchd and by the baseline DataLoader). "
                         "Never writes BENCHMARKS.md unless --markdown is given")
    ap.add_argument("--trainer-epochs", type=int, default=None,
                    help="data epochs the trainer section trains for (default: 1 with --quick, 2 in full)")
    ap.add_argument("--no-small", action="store_true")
    ap.add_argument("--verify-md5", default="false", choices=("auto", "true", "false"),
                    help="prefetchd's s3.verify_md5 (default false: the real bucket is https, where TLS already "
                         "authenticates the bytes and the daemon's `auto` skips MD5; this loopback server is http)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="add a py-spy run of the daemon (default in full mode)")
    ap.add_argument("--data-dir", default=os.environ.get("BENCH_DATA_DIR", str(Path(tempfile.gettempdir()) / "prefetchd-bench-data")))
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--markdown", default=None, help="BENCHMARKS.md path (full mode default: ./BENCHMARKS.md)")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_one:
        job = json.loads(Path(a.run_one).read_text())
        out = run_one(job)
        Path(a.out_json).write_text(json.dumps(out))
        return 0
    plan = quick_plan() if a.quick else full_plan()
    for attr, val in (("latency_ms", a.latency_ms), ("conn_mbps", a.conn_mbps), ("total_mbps", a.total_mbps),
                      ("fields", a.fields), ("size", a.size), ("epochs", a.epochs),
                      ("trainer_epochs", a.trainer_epochs)):
        if val is not None:
            setattr(plan, attr, val)
    if a.systems:
        plan.systems = tuple(s for s in a.systems.split(",") if s)
    plan.small_variant = plan.small_variant and not a.no_small
    plan.profile = (plan.profile or a.profile) and not a.no_profile
    if a.only:
        apply_only(plan, a.only)
    return run_all(plan, a)


def run_all(plan: Plan, a) -> int:
    from bench.latency_proxy import LatencyProxy
    from bench.servers import S3Server
    from prefetchd.dev import synth

    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    data_root = Path(a.data_dir)
    data_root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "machine": machine_info(),
                               "command": " ".join(["python -m bench.compare", *sys.argv[1:]]), "runs": {},
                               "verify_md5": getattr(a, "verify_md5", "false")}
    t0 = time.perf_counter()
    data = {"full": ensure_plates(data_root, plan.fields, plan.size)}
    if plan.small_variant:
        data["small"] = ensure_plates(data_root, plan.fields, plan.small_size)
    results["generate_s"] = time.perf_counter() - t0
    log(f"data: {data['full'][0].field_count} fields of 5×{plan.size}² (+ small {plan.small_size}²) in {data_root} "
        f"({results['generate_s']:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="prefetchd-bench-") as tmp:
        work = Path(tmp)
        # The server's data dir persists beside the plates, so later runs skip the upload.
        with S3Server(a.server, data_root / f"s3-{a.server}") as server:
            t0 = time.perf_counter()
            for variant, (spec, manifest) in data.items():
                if not already_uploaded(server.endpoint_url, bucket_for(spec), manifest):
                    synth.upload(manifest, server.endpoint_url, bucket_for(spec), workers=8)
            results["server"] = {"kind": a.server, "startup_s": server.startup_s,
                                 "upload_s": time.perf_counter() - t0}
            log(f"server: {a.server} at {server.endpoint_url} (up in {server.startup_s:.1f} s, "
                f"upload {results['server']['upload_s']:.1f} s)")
            with LatencyProxy(server.endpoint_url, plan.latency_ms, plan.conn_mbps, plan.total_mbps) as proxy:
                log(f"proxy: {proxy.endpoint_url} latency {plan.latency_ms:g} ms, per-connection "
                    f"{plan.conn_mbps or '∞'} MB/s, total {plan.total_mbps or '∞'} MB/s")
                ctx = {"data": data, "server": server, "proxy": proxy, "work": work, "verify_md5": getattr(a, "verify_md5", "false")}
                runs = results["runs"]
                for regime in plan.regimes:
                    runs[regime] = run_regime(regime, plan, ctx, plan.systems, log=log, repeats=plan.repeats)
                if plan.small_variant:
                    runs["small-large"] = run_regime("large", plan, ctx, LIKE_FOR_LIKE, variant="small", log=log)
                if plan.stall_systems:
                    runs["stall"] = run_regime("large", plan, ctx, plan.stall_systems, demand=plan.demand, epochs=1,
                                               log=lambda m: log(m + f"  [demand {plan.demand:g} fields/s]"))
                if plan.stall_systems and plan.stall_cap_ratio:
                    cap = plan.stall_cap_ratio * plan.demand * field_megabytes(data["full"][1])
                    results["stall_cap_mbps"] = cap
                    with LatencyProxy(server.endpoint_url, plan.latency_ms, plan.conn_mbps, cap) as capped:
                        runs["stall-capped"] = run_regime(
                            "large", plan, dict(ctx, proxy=capped), plan.stall_systems, demand=plan.demand, epochs=1,
                            log=lambda m: log(m + f"  [demand {plan.demand:g} fields/s, total cap {cap:.0f} MB/s]"))
                if plan.trainer_systems:
                    runs["trainer"] = run_trainer_section(plan, ctx, log=log)
                if plan.cache_sweep:
                    runs["policy"] = {}
                    for policy in ("lru", "belady"):
                        r = run_regime("large", plan, ctx, ["prefetchd-opencv"], extra={"policy": policy},
                                       log=lambda m, p=policy: log(m + f"  [policy {p}]"))
                        runs["policy"][policy] = r["prefetchd-opencv"]
                if plan.latency_sweep:
                    runs["latency"] = {}
                    for lat in plan.latency_sweep:
                        with LatencyProxy(server.endpoint_url, lat, plan.conn_mbps, plan.total_mbps) as px2:
                            ctx2 = dict(ctx, proxy=px2)
                            runs["latency"][lat] = run_regime("large", plan, ctx2, LIKE_FOR_LIKE, epochs=1,
                                                              log=lambda m, l=lat: log(m + f"  [latency {l:g} ms]"))
                for regime in plan.regimes:
                    spec, manifest = data["full"]
                    n = next(iter(runs[regime].values()))["n_fields"]
                    cache = plan.fits_cache if regime == "fits" else plan.large_cache
                    results.setdefault("bounds", {})[regime] = bounds_for(n, cache, plan.epochs, plan.batch_size)
                prof = None
                if plan.profile:  # a separate run: py-spy's own CPU must not land in the measured runs
                    runs["profiled"] = run_regime("large", plan, ctx, ["prefetchd-opencv"], epochs=1,
                                                  extra={"profile": True},
                                                  log=lambda m: log(m + "  [under py-spy, not comparable]"))
                    prof = runs["profiled"]["prefetchd-opencv"].get("profile_path")
                results["profile"] = summarize_profile(prof) if prof else {}
                if prof and Path(prof).exists():
                    shutil.copy(prof, data_root / "pyspy-daemon-raw.txt")
                # prefetchd's decode-side stage costs, measured in-process on one field of the dataset
                md5_on = getattr(a, "verify_md5", "false") in ("true", "auto")  # auto: on over this http server
                results["stage_ms"] = {s: stage_costs_prefetchd(data["full"][1], data["full"][1].root, prefetchd_options(s) or
                                                                {"illum": True}, md5=md5_on)
                                       for s in ("prefetchd-opencv", "prefetchd") if s in plan.systems and plan.regimes}
    results["total_s"] = time.perf_counter() - t_start
    if a.json:
        Path(a.json).write_text(json.dumps(results, default=str, indent=1))
    from bench.report import print_summary, write_markdown

    print_summary(results, log)
    if (not a.quick and not getattr(a, "only", None)) or getattr(a, "markdown", None):
        md = Path(a.markdown or ROOT / "BENCHMARKS.md")
        write_markdown(results, md, md.parent / "docs" / "img")  # plots beside the markdown (docs/img/bench_*.png)
    ratio = ratio_vs_seed(results)
    print(f"ratio_vs_seed={ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
