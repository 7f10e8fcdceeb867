"""One daemon's serial ceiling: main-thread vs other CPU per field, and fields/s vs the cores it is given.

    python -m bench.ceiling                      # full matrix (~5 min on 2 cores); last line main_ms_per_field=… ceiling_fps=…
    python -m bench.ceiling --markdown BENCHMARKS.md   # also (re)writes its section there and the plot
    python -m bench.ceiling --quick              # seconds: a smoke run

The daemon's event loop is one thread, so whatever it spends per field caps the node however many cores it has
(DESIGN.md, "One node at GPU rates"): ceiling = 1000 / main-thread ms per field. This streams one epoch of
synthetic 5-channel uint16 fields (prefetchd.dev.synth, real key names) from `rclone serve s3` on loopback — over
http and over https with a certificate from a CA made for the run (trusted through AWS_CA_BUNDLE, as a private
CA would be) — into a real `prefetchd serve`, for every GET transport asked for (threads = the default for
unsigned access; obstore = the default before it and for signed access; aiohttp = the default before that, the
first "before"), with preprocessing off, the defaults (illum, rescale, CLAHE), and
the GPU-node setting `clahe.where: trainer` (the daemon ships rescaled uint16; CLAHE runs on the trainer's
device). The daemon is pinned to 1, 2, … cores (every thread: sched_setaffinity) with `decode.workers` = cores;
the S3 server and the consumer run on the other cores when there are any.

Per run, from the first batch (index built, connections warm, the arena resident) to the end of the epoch: the daemon's main-thread
CPU (/proc/<pid>/task/<pid>/schedstat, ns), its whole-process CPU (/proc/<pid>/stat), fields fetched (the
daemon's own counter; every field is a miss in epoch 0), fields/s delivered to the consumer, and the CPU the
rest of the machine used meanwhile (`other load`, cores: the machine is shared). `verify_md5` is the default
`auto`: on over http, off over https (TLS already authenticates the bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "ceiling"
PREPS = {
    "off": {"illum": False, "rescale": False, "clahe": False},
    "defaults": {},
    "trainer": {"clahe": {"where": "trainer"}},
}
PREP_LABELS = {"off": "preprocessing off", "defaults": "defaults (illum, rescale, CLAHE)",
               "trainer": "clahe.where: trainer (GPU node)"}
MARK_START, MARK_END = "<!-- bench.ceiling:start -->", "<!-- bench.ceiling:end -->"


@dataclass
class Run:
    scheme: str
    transport: str
    prep: str
    cores: int
    fields: int = 0            # fetched by the daemon while measured
    served: int = 0            # delivered to the consumer while measured
    wall_s: float = 0.0
    main_cpu_s: float = 0.0
    total_cpu_s: float = 0.0
    threads: dict = field(default_factory=dict)   # thread name -> CPU s while measured
    other_cores: float = 0.0
    populate_s: float = 0.0    # waited for the arena to be resident before measuring
    error: str = ""

    @property
    def main_ms(self) -> float:
        return self.main_cpu_s * 1e3 / self.fields if self.fields else float("nan")

    @property
    def total_ms(self) -> float:
        return self.total_cpu_s * 1e3 / self.fields if self.fields else float("nan")

    @property
    def fps(self) -> float:
        return self.served / self.wall_s if self.wall_s else 0.0

    @property
    def ceiling_fps(self) -> float:
        return 1000.0 / self.main_ms if self.fields and self.main_ms > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# CPU accounting


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) from schedstat (ns resolution; stat's ticks are 10 ms)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            name = (task / "comm").read_text().strip()
            out[int(task.name)] = (name, int((task / "schedstat").read_text().split()[0]) / 1e9)
    return out


def process_cpu(pid: int) -> float:
    """user+sys CPU seconds of the whole process, exited threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    parts = stat[stat.rindex(")") + 2:].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds (all processes)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (threads started later inherit it from the thread that starts them)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def group_name(name: str) -> str:
    """Thread pools by their name prefix: decode_0 → decode, tokio-runtime-w → tokio-runtime-w."""
    name = name.rstrip("0123456789_-") or name
    return "python threads" if name == "python" else name   # Python 3.11 does not name OS threads (decode, MD5)


# ---------------------------------------------------------------------------------------------
# Data and servers


def ensure_plates(data_dir: Path, fields: int, size: int):
    """Synthetic plates written straight into the served directory (rclone: a top-level folder is a bucket)."""
    from prefetchd.dev import synth

    spec = synth.demo_spec(fields=fields, size=size)
    root = data_dir / BUCKET
    marker = root / f".written-{spec.field_count}x{size}"
    if not marker.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        synth.write_plates(root, spec, workers=os.cpu_count() or 2)
        marker.write_text("ok")
    return spec


def daemon_env(ca_file: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    if ca_file:
        env["AWS_CA_BUNDLE"] = str(ca_file)
    return env


# ---------------------------------------------------------------------------------------------
# One run


def run_one(server, spec, workdir: Path, *, scheme: str, transport: str, prep: str, cores: int,
            batch_size: int, verify_md5: str = "auto", profile: bool = False, log=print) -> Run:
    from prefetchd.client import attach
    from prefetchd.dev.daemon_process import DaemonProcess

    run = Run(scheme, transport, prep, cores)
    cpus = sorted(os.sched_getaffinity(0))
    mine, others = set(cpus[:cores]), set(cpus[cores:]) or set(cpus)
    sock = Path(tempfile.mkdtemp(prefix="pfc-", dir="/tmp")) / "d.sock"
    overrides = [f"s3.endpoint_url={server.endpoint_url}", f"cache_dir={workdir / 'index'}", "log_level=warning",
                 f"s3.get_transport={transport}", f"decode.workers={cores}", f"s3.verify_md5={verify_md5}"]
    daemon = DaemonProcess(sock, overrides, log_path=workdir / f"daemon-{scheme}-{transport}-{prep}-{cores}.log",
                           env=daemon_env(server.ca_file))
    own_affinity = os.sched_getaffinity(0)
    spy = None
    try:
        daemon.start()
        pid = daemon.proc.pid
        pin(pid, mine)
        pin(server.proc.pid, others)
        os.sched_setaffinity(0, others)
        if profile:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", os.environ.get("PYSPY_RATE", "250"), "--format", "raw",
                                    "--threads", "--nonblocking", "-o",
                                    str(workdir / f"pyspy-{scheme}-{transport}-{prep}-{cores}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dataset = f"JUMPS3MultiView:bucket={BUCKET}:prefix={spec.prefix}"
        with attach(dataset, batch_size=batch_size, socket=sock, job=f"ceiling-{os.getpid()}",
                    cache_size=max(4 * batch_size, spec.field_count // 2), **PREPS[prep]) as stream:
            batches = iter(stream.epoch(0))
            next(batches)  # the index is built and the pools are warm
            # and the arena populated (once per job, in a background thread, in proportion to the cache; a real
            # job amortises it over millions of fields): measure the steady state from here
            shm_bytes = next(j for j in stream.status()["jobs"] if j["job"] == stream.job)["shm_bytes"]
            run.populate_s = wait_populated(pid, shm_bytes)
            status0 = stream.status()
            threads0, total0, busy0 = thread_cpu(pid), process_cpu(pid), busy_cpu_s()
            mine0, server0 = _self_cpu(), process_cpu(server.proc.pid)
            t0 = time.perf_counter()
            for batch in batches:
                run.served += len(batch.ids)
            run.wall_s = time.perf_counter() - t0
            threads1, total1, busy1 = thread_cpu(pid), process_cpu(pid), busy_cpu_s()
            mine1, server1 = _self_cpu(), process_cpu(server.proc.pid)
            status1 = stream.status()
        job0 = next(j for j in status0["jobs"] if j["job"] == stream.job)
        job1 = next(j for j in status1["jobs"] if j["job"] == stream.job)
        run.fields = job1["fields_fetched"] - job0["fields_fetched"]
        run.main_cpu_s = threads1[pid][1] - threads0.get(pid, ("", 0.0))[1]
        run.total_cpu_s = total1 - total0
        for tid, (name, cpu) in threads1.items():
            if tid != pid:
                key = group_name(name)
                run.threads[key] = run.threads.get(key, 0.0) + cpu - threads0.get(tid, (name, 0.0))[1]
        ours = run.total_cpu_s + (mine1 - mine0) + (server1 - server0)
        run.other_cores = max(0.0, (busy1 - busy0) - ours) / run.wall_s if run.wall_s else 0.0
    except Exception as exc:  # one failed configuration must not lose the others
        run.error = f"{type(exc).__name__}: {exc}"
        log(f"  {scheme} {transport} {prep} {cores}: FAILED {run.error}")
    finally:
        if spy is not None:
            spy.send_signal(2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(20)
        os.sched_setaffinity(0, own_affinity)
        with contextlib.suppress(Exception):
            daemon.stop()
    return run


def shm_resident(pid: int) -> int:
    """Bytes of shared memory mapped and resident in `pid` (RssShmem)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_populated(pid: int, nbytes: int, timeout_s: float = 120.0) -> float:
    """Wait until the daemon's arena of `nbytes` is resident (its prefault thread is done); the seconds waited."""
    start = time.perf_counter()
    while shm_resident(pid) < 0.99 * nbytes and time.perf_counter() - start < timeout_s:
        time.sleep(0.02)
    return time.perf_counter() - start


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = ("scheme", "transport", "preprocessing", "cores", "fields", "fields/s", "main ms/field", "other ms/field",
           "total ms/field", "ceiling fields/s", "busiest other threads (ms/field)", "other load (cores)")


def row(r: Run) -> list[str]:
    if r.error or not r.fields:
        r.error = r.error or "no field fetched while measured (a longer epoch: --fields)"
        return [r.scheme, r.transport, r.prep, str(r.cores), "failed: " + r.error] + [""] * (len(COLUMNS) - 5)
    top = [kv for kv in sorted(r.threads.items(), key=lambda kv: -kv[1])[:3] if kv[1] * 1e3 / r.fields >= 0.05]
    return [r.scheme, r.transport, r.prep, str(r.cores), str(r.fields), f"{r.fps:.1f}", f"{r.main_ms:.2f}",
            f"{r.total_ms - r.main_ms:.1f}", f"{r.total_ms:.1f}", f"{r.ceiling_fps:,.0f}",
            ", ".join(f"{k} {v * 1e3 / r.fields:.1f}" for k, v in top), f"{r.other_cores:.2f}"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(x[i]) for x in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths)) for x in rows]
    return "\n".join(lines)


def md_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(out + ["| " + " | ".join(x) + " |" for x in rows])


def headline(runs: list[Run], transport: str) -> tuple[float, float]:
    """The serial cost that caps the daemon: the worst main-thread ms per field of `transport` with preprocessing
    off or at the defaults, at the most cores measured (over every scheme)."""
    ok = [r for r in runs if not r.error and r.fields and r.transport == transport and r.prep in ("off", "defaults")]
    if not ok:
        return float("nan"), 0.0
    most = max(r.cores for r in ok)
    main = round(max(r.main_ms for r in ok if r.cores == most), 3)   # the ceiling is of the figure printed
    return main, 1000.0 / main


def comparison_rows(runs: list[Run], transports: list[str]) -> list[list[str]]:
    """Per scheme and preprocessing, at the most cores: each transport's main and total ms per field and fields/s."""
    ok = [r for r in runs if not r.error and r.fields]
    if not ok:
        return []
    most = max(r.cores for r in ok)
    out = []
    for scheme in dict.fromkeys(r.scheme for r in ok):
        for prep in dict.fromkeys(r.prep for r in ok):
            by = {r.transport: r for r in ok if r.scheme == scheme and r.prep == prep and r.cores == most}
            if not by:
                continue
            cells = [scheme, prep]
            for t in transports:
                r = by.get(t)
                cells += [f"{r.main_ms:.2f} / {r.total_ms:.1f} / {r.fps:.1f}" if r else "–"]
            base, new = by.get(transports[-1]), by.get(transports[0])
            cells.append(f"{base.main_ms / new.main_ms:.1f}×" if base and new and len(transports) > 1 else "")
            out.append(cells)
    return out


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in runs if not r.error and r.fields]
    colours = {k: f"C{i}" for i, k in enumerate(dict.fromkeys((r.scheme, r.prep) for r in ok))}
    styles = {t: s for t, s in zip(dict.fromkeys(r.transport for r in ok), ("o-", "s--", "^:", "d-."))}
    for key in dict.fromkeys((r.transport, r.scheme, r.prep) for r in ok):
        pts = sorted((r.cores, r.fps) for r in ok if (r.transport, r.scheme, r.prep) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[key[0]], color=colours[key[1:]],
                label=f"{key[0]}, {key[1]}, {key[2]}")
    ax.set_xlabel("cores given to the daemon (taskset)")
    ax.set_ylabel("fields/s delivered")
    ax.set_xticks(sorted({r.cores for r in ok}))
    ax.set_title("one daemon: fields/s vs cores (5 × 1080² uint16 fields, rclone on loopback)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(runs: list[Run], args, command: str, transports: list[str], elapsed_s: float,
                     img: str | None) -> str:
    main, ceiling = headline(runs, transports[0])
    cores = sorted({r.cores for r in runs})
    lines = [
        MARK_START,
        "## One daemon's ceiling: main-thread CPU per field and fields/s vs cores",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {elapsed_s:.0f} s "
        f"({os.cpu_count()} CPUs; other helpers share the machine: see `other load`). One epoch of {args.fields} fields "
        f"of 5 × {args.size}² uint16, batch {args.batch_size}, from `rclone serve s3` on loopback over http and https "
        "(a CA made for the run, trusted through AWS_CA_BUNDLE); the daemon pinned to the given cores with "
        "`decode.workers` = cores, the server and the consumer on the other core(s) where there are any. Measured from "
        "the first batch (and the arena resident: populating it is a one-off cost per job, in proportion to the "
        "cache, that a real job amortises over millions of fields) to the end of the epoch; ms are CPU ms per field "
        "fetched. `main` = the event loop's thread "
        "(/proc schedstat), `other` = every other thread of the daemon; ceiling = 1000 / main ms. "
        + ("MD5 checks are on over http and off over https (`s3.verify_md5: auto`). " if args.verify_md5 == "auto"
           else f"`s3.verify_md5: {args.verify_md5}` (over https, the real bucket, `auto` turns it off too: TLS "
                "authenticates the bytes; over http it costs an MD5 of every body). ")
        + "`threads` is the default GET transport for unsigned access, `obstore` the one before it (and the one "
        "for signed access), `aiohttp` the one before that. See `python -m bench.ceiling --help`.",
        "",
        f"**Ceiling ({transports[0]}, worst of preprocessing off / defaults over http and https, {max(cores)} "
        f"core(s)): main thread {main:.2f} ms per field → {ceiling:,.0f} fields/s.**",
        "",
    ]
    comp = comparison_rows(runs, transports)
    if comp and len(transports) > 1:
        lines += [f"Side by side at {max(cores)} core(s) — main ms / total ms per field / fields/s:", "",
                  md_table(["scheme", "preprocessing", *transports, f"main-thread ratio {transports[-1]} ÷ {transports[0]}"],
                           comp), ""]
    lines += ["All runs:", "", md_table(COLUMNS, [row(r) for r in runs]), ""]
    if img:
        lines += [f"![fields/s vs cores]({img})", ""]
    lines += [f"`main_ms_per_field={main:.3f} ceiling_fps={ceiling:.0f}`", "", MARK_END]
    return "\n".join(lines)


def carry_section(path: Path, text: str) -> str:
    """`text` (a regenerated BENCHMARKS.md, e.g. by bench.compare) with this benchmark's section from the file
    at `path` put back, so regenerating one section never drops another."""
    old = path.read_text() if path.exists() else ""
    if MARK_START not in old or MARK_END not in old or MARK_START in text:
        return text
    section = MARK_START + old.split(MARK_START, 1)[1].split(MARK_END, 1)[0] + MARK_END
    anchor = "\n## Reproduce"
    return text.replace(anchor, "\n" + section + "\n" + anchor, 1) if anchor in text else text + "\n" + section + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers), leaving the others as they are."""
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        after = rest.split(MARK_END, 1)[1]
        text = before + section + after
    else:
        anchor = "\n## Reproduce"
        text = text.replace(anchor, "\n" + section + "\n" + anchor, 1) if anchor in text else text + "\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=128, help="fields in the epoch (default 128)")
    ap.add_argument("--size", type=int, default=1080, help="image side in pixels (default 1080)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cores", default="", help="comma-separated core counts (default 1..all)")
    ap.add_argument("--schemes", default="http,https")
    ap.add_argument("--preps", default="off,defaults,trainer", help=f"of {', '.join(PREPS)}")
    ap.add_argument("--transports", default="threads,obstore,aiohttp",
                    help="GET transports; the first is the one the headline is for (default threads,obstore,aiohttp)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prefetchd-ceiling"),
                    help="plates and logs (plates are reused across runs)")
    ap.add_argument("--markdown", help="write this benchmark's section into this file (e.g. BENCHMARKS.md)")
    ap.add_argument("--json", help="also write the runs as JSON here")
    ap.add_argument("--verify-md5", default="auto", choices=("auto", "true", "false"),
                    help="s3.verify_md5 for the daemon (auto: on over http, off over https)")
    ap.add_argument("--py-spy", action="store_true", help="record each daemon with py-spy into the workdir")
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: 32 small fields, http, off, 1 core")
    a = ap.parse_args(argv)
    if a.quick:
        given = argv if argv is not None else sys.argv[1:]
        a.fields, a.size, a.batch_size, a.preps, a.cores = 32, 256, 2, "off", "1"
        a.schemes = a.schemes if "--schemes" in given else "http"
        a.transports = a.transports if "--transports" in given else "threads"
    ncpu = len(os.sched_getaffinity(0))
    cores = [int(c) for c in a.cores.split(",")] if a.cores else list(range(1, ncpu + 1))
    transports = a.transports.split(",")
    preps = a.preps.split(",")
    bad = [p for p in preps if p not in PREPS]
    if bad:
        ap.error(f"--preps: unknown {', '.join(bad)}; accepted: {', '.join(PREPS)}")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    from bench.servers import S3Server

    print(f"plates: {a.fields} fields of 5 × {a.size}² in {workdir / 'data' / BUCKET}", flush=True)
    spec = ensure_plates(workdir / "data", a.fields, a.size)
    runs: list[Run] = []
    for scheme in a.schemes.split(","):
        with S3Server("rclone", workdir, tls=scheme == "https") as server:
            for prep in preps:
                for c in cores:
                    for transport in transports:   # interleaved: drift in the machine's load hits all alike
                        r = run_one(server, spec, workdir, scheme=scheme, transport=transport, prep=prep, cores=c,
                                    batch_size=a.batch_size, verify_md5=a.verify_md5, profile=a.py_spy)
                        runs.append(r)
                        if not r.error:
                            print(f"{scheme:5} {transport:8} {prep:8} cores={c}  {r.fps:7.1f} fields/s  main "
                                  f"{r.main_ms:6.2f} ms/field  total {r.total_ms:6.1f} ms/field  other load "
                                  f"{r.other_cores:.2f}", flush=True)
    elapsed = time.perf_counter() - t_start
    print()
    print(text_table([row(r) for r in runs]))
    comp = comparison_rows(runs, transports)
    if comp and len(transports) > 1:
        print("\nside by side (main ms / total ms per field / fields/s):")
        for cells in comp:
            print("  " + "  ".join(cells))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if a.markdown:
        md = Path(a.markdown)
        img_rel = "docs/img/bench_ceiling_cores.png"
        plot(runs, md.parent / img_rel)
        command = "python -m bench.ceiling " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(md, markdown_section(runs, a, command.strip(), transports, elapsed, img_rel))
        print(f"wrote {md} section and {img_rel}")
    main_ms, ceiling = headline(runs, transports[0])
    print(f"main_ms_per_field={main_ms:.3f} ceiling_fps={ceiling:.0f}")
    return 0 if runs and not any(r.error for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
