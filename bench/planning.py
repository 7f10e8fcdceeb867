"""The daemon's serial cost per field at real cache sizes: planning (prefetch + eviction) and the control plane.

    python -m bench.planning                         # 2,000 and 20,000 slots, 8 ranks (≤ 2 min measured each)
    python -m bench.planning --slots 2000 --ranks 8  # one size
    python -m bench.planning --markdown BENCHMARKS.md   # also (re)writes its section there

A real `prefetchd serve` and 8 ranks attached through the public client (one thread each) read two epochs of a
local dataset (`JUMPLocal`) twice the cache's size, of tiny fields (5 × 32² by default) so that fetching and
decoding are cheap and what remains on the event loop is planning, leasing and the socket. Every field key
holds the same small TIFF (the planner does not look at pixels), written once into the work directory. Per
policy and cache size it prints the daemon's main-thread CPU per field served (/proc schedstat), its whole
CPU per field, fields/s, the planner's own CPU per field (plan and demand fetch, timed in the daemon: the job's
`planning_cpu_s`), and the last line `slots=… planning_ms_per_field=… main_ms_per_field=…` for the largest
size. DESIGN.md's target: planning ≤ 0.1 ms per field amortised at 20,000 slots and 8 ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tifffile

from bench.ceiling import daemon_env, process_cpu, thread_cpu


def ensure_dataset(workdir: Path, fields: int, size: int):
    """The synthetic key layout for at least `fields` fields on whole 384-well plates of 9 sites (JUMP's),
    every image the same `size`² TIFF (no rendering)."""
    from prefetchd.dev import synth

    sites, wells = 9, synth.balanced_wells(384)     # JUMP: 384-well plates, 9 sites per well
    plates = -(-fields // (sites * len(wells)))
    spec = synth.SynthSpec(
        batches={"2020_11_04_CPJUMP1": tuple((f"BR{117000 + p:08d}", f"2020-11-05T19_{p // 60:02d}_{p % 60:02d}")
                                             for p in range(plates))},
        wells=wells, sites=sites, height=size, width=size, with_illum=False)
    root = workdir / f"local-{spec.field_count}x{size}"
    marker = root / ".complete"
    if not marker.exists():
        manifest = synth.build_manifest(spec, root)
        buf = io.BytesIO()
        tifffile.imwrite(buf, (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 7) + 300,
                         photometric="minisblack")
        body = buf.getvalue()
        made: set[Path] = set()
        for key in manifest.all_keys:
            path = root / key
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            if key.endswith(".tiff"):
                path.write_bytes(body)
        marker.write_text("ok")
    return spec, root


def run_one(root: Path, spec, *, slots: int, ranks: int, batch_size: int, policy: str, epochs: int,
            workdir: Path, max_seconds: float) -> dict:
    from prefetchd.client import attach
    from prefetchd.control import request
    from prefetchd.dev.daemon_process import DaemonProcess

    sock = Path(tempfile.mkdtemp(prefix="pfp-", dir="/tmp")) / "d.sock"
    daemon = DaemonProcess(sock, [f"cache_dir={workdir / 'index'}", "log_level=warning"],
                           log_path=workdir / f"daemon-{policy}-{slots}.log", env=daemon_env(None))
    dataset = f"JUMPLocal:root={root / spec.prefix}"
    daemon.start()
    pid = daemon.proc.pid
    try:
        streams = [attach(dataset, batch_size=batch_size, rank=r, world_size=ranks, socket=sock, job="planning",
                          cache_size=slots, policy=policy, illum=False, rescale=False, clahe=False)
                   for r in range(ranks)]
        first = threading.Barrier(ranks + 1)
        served = [0] * ranks
        errors: list[BaseException] = []
        stop = threading.Event()   # after max_seconds of measurement: a slow planner must not take an hour

        def consume(r: int) -> None:
            try:
                for e in range(epochs):
                    for i, batch in enumerate(streams[r].epoch(e)):
                        if e == 0 and i == 0:
                            first.wait(600)
                        else:
                            served[r] += len(batch.ids)
                        if stop.is_set():
                            return
            except BaseException as exc:  # noqa: BLE001 — re-raised in the main thread
                errors.append(exc)
                with contextlib.suppress(threading.BrokenBarrierError):
                    first.abort()

        threads = [threading.Thread(target=consume, args=(r,), daemon=True) for r in range(ranks)]
        for t in threads:
            t.start()
        first.wait(600)   # every rank has its first batch: the index is built, the arena exists
        planning0 = _job(request("status", sock))["planning_cpu_s"]   # own connection: the ranks use theirs
        main0, total0, t0 = thread_cpu(pid)[pid][1], process_cpu(pid), time.perf_counter()
        deadline = t0 + max_seconds
        for t in threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        main1, total1 = thread_cpu(pid)[pid][1], process_cpu(pid)
        planning1 = _job(request("status", sock))["planning_cpu_s"]
        wall = time.perf_counter() - t0
        n = sum(served)
        stop.set()
        for t in threads:
            t.join(600)
        if errors:
            raise errors[0]
        job = _job(streams[0].status())
        for s in streams:
            s.close()
        return {"slots": slots, "ranks": ranks, "policy": policy, "fields": spec.field_count, "served": n,
                "main_ms": (main1 - main0) * 1e3 / n, "total_ms": (total1 - total0) * 1e3 / n, "fps": n / wall,
                "hit_rate": job["hit_rate"], "planning_ms": (planning1 - planning0) * 1e3 / n}
    finally:
        daemon.stop()


MARK_START, MARK_END = "<!-- bench.planning:start -->", "<!-- bench.planning:end -->"
TARGET_MS = 0.1   # DESIGN.md: planning per field, amortised, at 20,000 slots and 8 ranks


def markdown_section(results: list[dict], a, command: str, elapsed_s: float) -> str:
    last = _headline(results)
    columns = ["policy", "slots", "ranks", "fields", "served", "fields/s", "hit rate", "planning ms/field",
               "main ms/field", "total ms/field"]
    rows = [[r["policy"], f"{r['slots']:,}", str(r["ranks"]), f"{r['fields']:,}", f"{r['served']:,}",
             f"{r['fps']:.1f}", f"{r['hit_rate']:.0%}", f"{r['planning_ms']:.3f}", f"{r['main_ms']:.3f}",
             f"{r['total_ms']:.3f}"] for r in results]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(x) + " |" for x in rows]
    return "\n".join([
        MARK_START,
        "## The planner's cost at real cache sizes",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {elapsed_s:.0f} s "
        f"({os.cpu_count()} CPUs, shared with other helpers). A real `prefetchd serve` and {a.ranks} ranks attached "
        f"through the public client read {a.epochs} epochs (at most {a.max_seconds:g} s measured per run) of a local "
        f"dataset twice the cache's size, of tiny fields (5 × {a.size}²), batch {a.batch_size}, so that what remains "
        "on the event loop is planning, leasing and the socket. `planning` = the planner's own CPU (prefetch and "
        "demand fetch, timed in the daemon: the job's `planning_cpu_s`); `main` = the event loop's thread (/proc "
        "schedstat), planning included; `total` = the whole daemon; all per field served. Target (issue #13): "
        f"planning ≤ {TARGET_MS} ms per field amortised at 20,000 slots and 8 ranks.",
        "",
        *table,
        "",
        f"`slots={last['slots']} ranks={last['ranks']} policy={last['policy']} "
        f"planning_ms_per_field={last['planning_ms']:.3f} main_ms_per_field={last['main_ms']:.3f}`",
        "",
        MARK_END,
    ])


def carry_section(path: Path, text: str) -> str:
    """For bench.compare, which rewrites BENCHMARKS.md: this benchmark's section put back."""
    from bench.sections import carry_section as carry

    return carry(path, text, MARK_START, MARK_END)


def _headline(results: list[dict]) -> dict:
    return max(results, key=lambda r: (r["slots"], r["policy"] == "belady"))


def _job(status: dict) -> dict:
    return next(j for j in status["jobs"] if j["job"] == "planning")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.planning", description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="2000,20000", help="cache sizes in fields, comma-separated")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="image side (tiny: the planner is what is measured)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--policies", default="belady,lru")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="measure at most this long per run (from every rank's first batch)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prefetchd-planning"))
    ap.add_argument("--markdown", help="write this benchmark's section into this file (e.g. BENCHMARKS.md)")
    a = ap.parse_args(argv)
    started = time.perf_counter()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'policy':7} {'slots':>6} {'ranks':>5} {'fields':>6} {'served':>7} {'fields/s':>9} {'hit rate':>8} "
          f"{'planning ms/field':>17} {'main ms/field':>13} {'total ms/field':>14}", flush=True)
    for slots in (int(s) for s in a.slots.split(",")):
        spec, root = ensure_dataset(workdir, 2 * slots, a.size)   # a dataset larger than the cache
        for policy in a.policies.split(","):
            r = run_one(root, spec, slots=slots, ranks=a.ranks, batch_size=a.batch_size, policy=policy,
                        epochs=a.epochs, workdir=workdir, max_seconds=a.max_seconds)
            results.append(r)
            print(f"{policy:7} {slots:>6} {a.ranks:>5} {r['fields']:>6} {r['served']:>7} {r['fps']:>9.1f} "
                  f"{r['hit_rate']:>8.0%} {r['planning_ms']:>17.3f} {r['main_ms']:>13.3f} {r['total_ms']:>14.3f}",
                  flush=True)
    last = _headline(results)
    if a.markdown:
        from bench.sections import write_section

        command = "python -m bench.planning " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(Path(a.markdown), markdown_section(results, a, command.strip(), time.perf_counter() - started),
                      MARK_START, MARK_END)
        print(f"wrote {a.markdown} section")
    print(f"slots={last['slots']} ranks={last['ranks']} policy={last['policy']} "
          f"planning_ms_per_field={last['planning_ms']:.3f} main_ms_per_field={last['main_ms']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
