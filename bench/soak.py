"""Soak: continuous serving to two consumers through 5% injected S3 faults, with one daemon restart.

    python -m bench.soak [--minutes 10] [--fault-rate 0.05] [--fields 48]

Everything is local and real: moto's S3 on loopback, tests/faultproxy.py in front of it (503, 500,
reset, truncated and corrupt bodies at `--fault-rate`, plus a few always-bad objects that must be
quarantined), `prefetchd serve` as a subprocess, and two ranks of one job reading epochs back to back
in threads. Halfway through the daemon is SIGKILLed and restarted on the same socket; the clients
reconnect. For every complete epoch each rank's delivered ids are compared with `schedule(...)`
(quarantined fields replaced by their substitute): lost and duplicated must both be 0.
Prints delivered, lost, duplicated, quarantined, RSS and open fds of the daemon at start and end.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy  # noqa: E402

from prefetchd.dev import synth  # noqa: E402
from prefetchd.client import attach  # noqa: E402
from prefetchd.control import request  # noqa: E402
from prefetchd.dev.daemon_process import DaemonProcess  # noqa: E402
from prefetchd.dev.locals3 import LocalS3  # noqa: E402

RAW = {"illum": False, "clahe": False, "rescale": False}


def proc_stats(pid: int) -> tuple[int, int]:
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")) * 1024
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def consumer(sock: Path, dataset: str, rank: int, stop: threading.Event, out: dict, errors: list) -> None:
    try:
        with attach(dataset, batch_size=4, seed=3, rank=rank, world_size=2, socket=sock, job="soak",
                    cache_size=32, reconnect_timeout_s=120, **RAW) as stream:
            epoch = 0
            while not stop.is_set():
                ids = [i for b in stream.epoch(epoch) for i in b.ids]
                out[(rank, epoch)] = ids
                epoch += 1
    except Exception as exc:  # reported, not swallowed
        errors.append(f"rank {rank}: {type(exc).__name__}: {exc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--fields", type=int, default=48)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pfsoak-", dir="/tmp"))
    spec = synth.demo_spec(fields=args.fields, size=128)
    manifest = synth.write_plates(work / "data", spec)
    with LocalS3() as s3, FaultProxy(upstream=s3.endpoint_url, seed=7) as proxy:
        synth.upload(manifest, s3.endpoint_url, "soak")
        dataset = f"JUMPS3MultiView:bucket=soak:prefix={spec.prefix}"
        bad = manifest.fields[1]
        proxy.add_rule("404", match=next(iter(bad.keys.values())))  # first: this object is always missing
        per_mode = args.fault_rate / 5
        for mode in ("503", "500", "reset", "truncate", "corrupt"):
            proxy.add_rule(mode, probability=per_mode)
        overrides = [f"s3.endpoint_url={proxy.url}", f"cache_dir={work / 'cache'}", "s3.read_timeout_s=2"]
        sock = work / "p.sock"
        daemon = DaemonProcess(sock, overrides, log_path=work / "daemon.log").start()
        stop, out, errors = threading.Event(), {}, []
        threads = [threading.Thread(target=consumer, args=(sock, dataset, r, stop, out, errors)) for r in (0, 1)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + args.minutes * 60
        warm = time.monotonic() + min(30, args.minutes * 6)
        while time.monotonic() < warm and not errors:
            time.sleep(0.5)  # a bench script: pacing the measurement, not synchronising
        rss0, fds0 = proc_stats(daemon.proc.pid)
        restart_at = time.monotonic() + (deadline - time.monotonic()) / 2
        restarted = False
        while time.monotonic() < deadline and not errors:
            time.sleep(1.0)
            if not restarted and time.monotonic() >= restart_at:
                daemon.proc.kill()
                daemon.proc.wait()
                daemon = DaemonProcess(sock, overrides, log_path=work / "daemon.log").start()
                restarted = True
                rss0, fds0 = proc_stats(daemon.proc.pid)  # a new process: measure growth from its start
                warm_after = time.monotonic() + min(30, args.minutes * 6)
                while time.monotonic() < warm_after and not errors:
                    time.sleep(0.5)
                rss0, fds0 = proc_stats(daemon.proc.pid)
        rss1, fds1 = proc_stats(daemon.proc.pid)
        status = request("status", sock)
        stop.set()
        for t in threads:
            t.join(300)
        daemon.stop()
    from prefetchd.schedule import schedule

    ids = sorted(f.id for f in manifest.fields)  # the index orders fields by id
    index_of = {f: i for i, f in enumerate(ids)}
    quarantined = {bad.id}
    delivered = lost = duplicated = 0
    for (rank, epoch), got in sorted(out.items()):
        want = [ids[i] for i in schedule(len(ids), 3, epoch, rank, 2, 4)]
        want = [_substitute(w, ids, index_of, quarantined) for w in want]
        delivered += len(got)
        c_got, c_want = collections.Counter(got), collections.Counter(want)
        lost += sum((c_want - c_got).values())
        duplicated += sum((c_got - c_want).values())
    report = {
        "minutes": args.minutes, "epochs_complete": len(out), "delivered": delivered, "lost": lost,
        "duplicated": duplicated, "quarantined": status["quarantined"], "retries": status["retries"],
        "faults_injected": len(proxy.faults()), "daemon_restarts": 1 if restarted else 0,
        "rss_start_mb": round(rss0 / 2**20, 1), "rss_end_mb": round(rss1 / 2**20, 1),
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1), "fds_start": fds0, "fds_end": fds1,
        "errors": errors,
    }
    print(json.dumps(report, indent=2))
    return 0 if lost == 0 and duplicated == 0 and not errors else 1


def _substitute(field_id, ids, index_of, quarantined):
    i = index_of[field_id]
    while ids[i % len(ids)] in quarantined:
        i += 1
    return ids[i % len(ids)]


if __name__ == "__main__":
    raise SystemExit(main())
