"""Soak: trainers read epochs for minutes through injected S3 faults, kills and restarts, and every field they
receive is judged by its pixels against an independent decode of the source.

    python -m bench.soak --minutes 10          # writes docs/bench/soak.json and docs/bench/soak.md

Everything is local and real: synthetic plates (prefetchd.synth, real key names, pixels that encode plate,
well, site and channel) on moto's S3 server, tests/faultproxy.py in front of it, `prefetchd serve` as a
subprocess, and each trainer rank its own process:

- job `raw`: 2 ranks, raw 16-bit pixels, a cache half the dataset (fields are evicted and fetched again);
- job `clahe`: 1 rank, illumination correction + OpenCV-compatible uint16 CLAHE (bins 65536).

Faults: `--fault-rate` of the object GETs get a 503, 500, reset, truncated body, corrupt bytes or a stall
(longer than the read timeout); two objects are always bad (404, corrupt) so their fields must be
quarantined. Events: a trainer rank SIGKILLed and restarted (it resumes from its own record, as from a
checkpoint), the daemon SIGKILLed and restarted on the same socket (trainers reconnect), later another
trainer kill. Each event waits until every trainer made progress since the previous one.

Trainers never judge by the ids in the daemon's replies: each records, per batch, a digest of every field's
pixels and (raw) the signature in its pixels; `bench.delivery` maps those back to source fields decoded
with tifffile/numpy/OpenCV and counts per complete epoch lost, duplicated (beyond the substitutes that stand
in for quarantined fields), wrong pixels and mislabelled fields. Also measured: the daemon's RSS and open
fds over the run (growth judged from the restarted daemon's warm state to the end), the trainers' too.
The machine may be shared: the load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy  # noqa: E402

from bench.delivery import SourceFields, Tally, digest, signatures  # noqa: E402
from prefetchd.dev import synth  # noqa: E402
from prefetchd.channels import DEFAULT_CHANNELS, PHENIX_CHANNELS  # noqa: E402
from prefetchd.control import request  # noqa: E402
from prefetchd.dev.daemon_process import DaemonProcess  # noqa: E402
from prefetchd.dev.locals3 import LocalS3  # noqa: E402

BATCH = 4
RANDOM_FAULTS = ("503", "500", "reset", "truncate", "corrupt", "stall")
STALL_S = 10.0              # a stalled GET holds its connection this long; the daemon gives up after READ_TIMEOUT_S
READ_TIMEOUT_S = 2.0
PROGRESS_TIMEOUT_S = 180.0  # an event waits at most this long for every trainer to make progress
LEAK_JUDGED_FROM_MINUTES = 5.0
QUARANTINE_LINE = re.compile(r"quarantined field (\S+): ")   # prefetchd.filler's ERROR line
RSS_GROWTH_LIMIT_PCT = 5.0
FD_GROWTH_LIMIT = 2


@dataclass(frozen=True)
class JobPlan:
    """One training job of the soak and how its trainers attach."""

    name: str
    world_size: int
    cache_size: int
    options: dict[str, Any]
    preprocessing: dict[str, Any] | None       # for bench.delivery.SourceFields (None = raw)


def job_plans(fields: int) -> list[JobPlan]:
    return [
        JobPlan("raw", 2, max(3 * BATCH * 2, fields // 2), {"illum": False, "clahe": False, "rescale": False}, None),
        JobPlan("clahe", 1, max(3 * BATCH, fields // 4),
                {"illum": True, "rescale": False, "clahe": {"clip_limit": 3.0, "tile_grid": 8, "bins": 65536}},
                {"illum": True, "clahe": {"clip_limit": 3.0, "tile_grid": 8}}),
    ]


# ---------------------------------------------------------------------------------------------------------
# A trainer rank: its own process, recording what it received


def consume(spec: dict[str, Any]) -> int:
    """Run as `python -m bench.soak --consume JSON`: read epochs until the stop file exists, one record line per
    batch. Ranks of a job move from epoch to epoch together, as DDP ranks do. A restarted rank resumes after
    the last batch it recorded, as a trainer resumes from a checkpoint."""
    from prefetchd.client import attach

    record = Path(spec["record"])
    epoch, start = resume_position(record, spec["batches_per_epoch"])
    with attach(spec["dataset"], batch_size=BATCH, seed=spec["seed"], rank=spec["rank"],
                world_size=spec["world_size"], socket=spec["socket"], job=spec["job"],
                reconnect_timeout_s=300, **spec["options"]) as stream, open(record, "ab", buffering=0) as out:
        while True:
            for batch in stream.epoch(epoch, start_batch=start):
                line = {"epoch": epoch, "batch": batch.index, "ids": batch.ids,
                        "digests": [digest(f) for f in batch.images],
                        "signatures": [signatures(f) for f in batch.images] if spec["raw"] else None,
                        "t": time.time(), "reconnects": stream.reconnects}
                out.write((json.dumps(line) + "\n").encode())  # one write per batch
            peers_done = wait_for_peers(spec, epoch)
            epoch, start = epoch + 1, 0
            if not peers_done or Path(spec["stop"]).exists():
                out.write((json.dumps({"stopped_after": epoch - 1}) + "\n").encode())
                return 0


def wait_for_peers(spec: dict[str, Any], epoch: int) -> bool:
    """The end-of-epoch barrier: True once every rank of the job recorded its last batch of `epoch`, False if
    one stopped instead (the soak is ending)."""
    last = spec["batches_per_epoch"] - 1
    while True:
        tails = [last_record(Path(p)) for p in spec["peer_records"]]
        if any(t is not None and "stopped_after" in t for t in tails):
            return False
        if all(t is not None and (t["epoch"], t["batch"]) >= (epoch, last) for t in tails):
            return True
        time.sleep(0.02)  # polling the peers' record files, as a barrier; a killed peer is restarted by the soak


def last_record(record: Path) -> dict | None:
    try:
        with open(record, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # torn by SIGKILL, or cut by the seek
    return None


def resume_position(record: Path, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch) after the last complete record line; a line torn by a SIGKILL is cut off."""
    if not record.exists():
        return 0, 0
    data = record.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(record, "r+b") as f:
            f.truncate(len(complete))
    lines = [json.loads(line) for line in complete.splitlines()]
    batches = [line for line in lines if "batch" in line]
    if not batches:
        return 0, 0
    last = batches[-1]
    if last["batch"] + 1 >= batches_per_epoch:
        return last["epoch"] + 1, 0
    return last["epoch"], last["batch"] + 1


def read_records(record: Path) -> list[dict]:
    if not record.exists():
        return []
    out = []
    for line in record.read_bytes().splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue  # a line torn by SIGKILL: the restarted rank asked for that batch again
        if "batch" in parsed:
            out.append(parsed)
    return out


@dataclass
class Trainer:
    """The soak's handle on one trainer rank's process."""

    plan: JobPlan
    rank: int
    spec: dict[str, Any]
    log_path: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    kills: int = 0
    _seen_bytes: int = 0
    _seen_lines: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return f"{self.plan.name}/rank{self.rank}"

    @property
    def record(self) -> Path:
        return Path(self.spec["record"])

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.soak", "--consume", json.dumps(self.spec)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    def sigkill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.kills += 1

    def batches(self) -> int:
        """Record lines so far (cheap: reads only what was appended since the last call)."""
        with self._lock:  # the sampler thread counts too
            try:
                with open(self.record, "rb") as f:
                    f.seek(self._seen_bytes)
                    appended = f.read()
            except FileNotFoundError:
                return 0
            self._seen_bytes += len(appended)
            self._seen_lines += appended.count(b"\n")
            return self._seen_lines

    def failure(self) -> str | None:
        """Why this trainer died on its own (a soak failure), if it did."""
        if self.proc is None or self.proc.poll() in (None, 0):
            return None
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return f"{self.name} exited with {self.proc.returncode}: {' | '.join(tail)}"


# ---------------------------------------------------------------------------------------------------------
# Measuring processes


def proc_stats(pid: int) -> tuple[int, int] | None:
    """(RSS bytes, open fds) of a live process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None


@dataclass
class Sample:
    t: float                      # seconds since the soak started
    daemon_pid: int
    daemon_rss: int
    daemon_fds: int
    trainer_rss: dict[str, int]
    trainer_fds: dict[str, int]
    batches: int                  # batches recorded by all trainers so far
    load1: float


class Sampler(threading.Thread):
    def __init__(self, soak: "Soak", every_s: float):
        super().__init__(name="sampler", daemon=True)
        self.soak, self.every_s = soak, every_s
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            sample = self.soak.sample()
            if sample is not None:
                self.samples.append(sample)


# ---------------------------------------------------------------------------------------------------------
# The soak


@dataclass
class Event:
    t: float
    what: str


@dataclass
class Soak:
    minutes: float
    fields: int
    size: int
    fault_rate: float
    seed: int
    work: Path
    events: list[Event] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.daemon: DaemonProcess | None = None
        self.daemon_starts: list[float] = []
        self.trainers: list[Trainer] = []
        self.daemon_counters: list[dict] = []   # each daemon's status at its end
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        self.events.append(Event(round(self.now(), 1), what))
        print(f"[{self.now():7.1f} s] {what}", flush=True)

    # ---- parts

    def start_daemon(self, sock: Path, overrides: list[str]) -> None:
        self.daemon = DaemonProcess(sock, overrides, log_path=self.work / "daemon.log", env=self.env).start()
        self.daemon_starts.append(self.now())

    def sample(self) -> Sample | None:
        daemon = self.daemon
        stats = proc_stats(daemon.proc.pid) if daemon and daemon.proc else None
        if stats is None:
            return None
        trainer_stats = {t.name: proc_stats(t.proc.pid) for t in self.trainers if t.proc and t.proc.poll() is None}
        trainer_stats = {k: v for k, v in trainer_stats.items() if v is not None}
        return Sample(round(self.now(), 1), daemon.proc.pid, stats[0], stats[1],
                      {k: v[0] for k, v in trainer_stats.items()}, {k: v[1] for k, v in trainer_stats.items()},
                      sum(t.batches() for t in self.trainers), os.getloadavg()[0])

    def check_trainers(self) -> None:
        for t in self.trainers:
            problem = t.failure()
            if problem and problem not in self.errors:
                self.errors.append(problem)

    def wait_for_progress(self, what: str, until: float) -> bool:
        """Wait until the soak clock reaches `until` and every trainer recorded a batch since now; False if the
        trainers stall for PROGRESS_TIMEOUT_S or one fails."""
        before = {t.name: t.batches() for t in self.trainers}
        deadline = time.monotonic() + max(0.0, until - self.now()) + PROGRESS_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_trainers()
            if self.errors:
                return False
            if self.now() >= until and all(t.batches() > before[t.name] for t in self.trainers):
                return True
            time.sleep(0.2)  # pacing a bench's polling of the trainers' record files
        self.errors.append(f"no progress from every trainer within {PROGRESS_TIMEOUT_S:.0f} s before {what}")
        return False

    # ---- run

    def run(self) -> dict[str, Any]:
        spec = synth.demo_spec(fields=self.fields, size=self.size, seed=self.seed)
        manifest = synth.write_plates(self.work / "data", spec)
        n = spec.field_count
        plans = job_plans(n)
        for plan in plans:
            if n % (plan.world_size * BATCH):
                raise SystemExit(f"--fields {n}: the field count must be a multiple of {plan.world_size * BATCH}")
        bad = {manifest.fields[1].id: "404", manifest.fields[n // 2 + 1].id: "corrupt"}
        bad_keys = {manifest.field_by_id(f).keys[PHENIX_CHANNELS["ER"]]: mode for f, mode in bad.items()}
        print(f"soak: {n} fields of 5 × {self.size}² uint16, {self.minutes:g} min, fault rate {self.fault_rate:g}; "
              f"decoding the source independently ...", flush=True)
        sources = {plan.name: SourceFields(manifest, DEFAULT_CHANNELS, plan.preprocessing) for plan in plans}
        with LocalS3() as s3, FaultProxy(upstream=s3.endpoint_url, seed=self.seed) as proxy:
            synth.upload(manifest, s3.endpoint_url, "soak")
            for key, mode in bad_keys.items():  # first rules: these objects are always bad
                proxy.add_rule(mode, match=key)
            for mode in RANDOM_FAULTS:
                proxy.add_rule(mode, probability=self.fault_rate / len(RANDOM_FAULTS), stall_s=STALL_S)
            sock = self.work / "p.sock"
            overrides = [f"s3.endpoint_url={proxy.url}", f"cache_dir={self.work / 'cache'}",
                         f"s3.read_timeout_s={READ_TIMEOUT_S}", "s3.connect_timeout_s=2"]
            self.t0 = time.monotonic()
            self.start_daemon(sock, overrides)
            self.note(f"daemon started (pid {self.daemon.proc.pid})")
            self.start_trainers(plans, f"JUMPS3MultiView:bucket=soak:prefix={spec.prefix}", sock, n)
            sampler = Sampler(self, every_s=max(1.0, self.minutes * 60 / 150))
            sampler.start()
            self.scenario(self.minutes * 60, sock, overrides)
            sampler.stop.set()  # the leak window ends while every trainer still reads
            sampler.join()
            ending = self.finish(sock)
            object_gets = [r for r in proxy.log if r.method == "GET" and ".tiff" in r.path]
            on_bad = [r for r in object_gets if any(k in r.path for k in bad_keys)]
            random_faults = [r for r in object_gets if r.fault and not any(k in r.path for k in bad_keys)]
        results = {plan.name: self.judge(plan, sources[plan.name], set(bad), n) for plan in plans}
        return self.report(spec, plans, bad, results, sampler.samples, ending, random_faults, len(object_gets),
                           len(on_bad))

    def start_trainers(self, plans: list[JobPlan], dataset: str, sock: Path, n: int) -> None:
        for plan in plans:
            records = [str(self.work / f"{plan.name}-rank{r}.jsonl") for r in range(plan.world_size)]
            for rank in range(plan.world_size):
                spec = {"dataset": dataset, "seed": self.seed, "rank": rank, "world_size": plan.world_size,
                        "socket": str(sock), "job": f"soak-{plan.name}-{os.getpid()}",
                        "options": {**plan.options, "cache_size": plan.cache_size},
                        "batches_per_epoch": n // plan.world_size // BATCH, "raw": plan.preprocessing is None,
                        "record": records[rank], "peer_records": records, "stop": str(self.stop_file)}
                self.trainers.append(Trainer(plan, rank, spec, self.work / f"{plan.name}-rank{rank}.log"))
        for t in self.trainers:
            t.start({**self.env, "LOCAL_WORLD_SIZE": str(t.plan.world_size)})

    @property
    def stop_file(self) -> Path:
        return self.work / "stop"

    def finish(self, sock: Path) -> dict[str, Any]:
        """Status while the trainers still read, then let them finish their epoch, then stop the daemon."""
        try:
            status = request("status", sock, timeout=30)
        except Exception as exc:
            status = {"jobs": []}
            self.errors.append(f"status at the end failed: {exc}")
        self.stop_file.touch()
        self.note("stop requested: trainers finish their epoch")
        for t in self.trainers:
            try:
                t.proc.wait(timeout=PROGRESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                t.proc.kill()
                t.proc.wait()
                self.errors.append(f"{t.name} did not finish its epoch within {PROGRESS_TIMEOUT_S:.0f} s")
        self.check_trainers()
        self.daemon_counters.append(request("status", sock, timeout=30))
        exit_code = self.daemon.stop()
        self.note(f"daemon stopped (exit {exit_code})")
        log = (self.work / "daemon.log").read_text(errors="replace")   # every daemon life, appended
        return {"status": status, "tracebacks": log.count("Traceback"), "exit_code": exit_code,
                "quarantined_in_run": sorted(set(QUARANTINE_LINE.findall(log)))}

    def judge(self, plan: JobPlan, source: SourceFields, bad: set[str], n: int) -> dict[str, Any]:
        """What this job's trainers recorded, identified by the pixels' digests and signatures."""
        tally = Tally(plan.world_size, n // plan.world_size // BATCH, source.ids, bad=bad)
        for t in (t for t in self.trainers if t.plan is plan):
            for r in read_records(t.record):
                sigs = r["signatures"] or [None] * len(r["digests"])
                tally.add(t.rank, r["epoch"], r["batch"], r["ids"],
                          [source.identify_received(d, sig) for d, sig in zip(r["digests"], sigs)])
        return tally.judge()

    def scenario(self, duration: float, sock: Path, overrides: list[str]) -> None:
        raw1 = next(t for t in self.trainers if t.plan.name == "raw" and t.rank == 1)
        clahe0 = next(t for t in self.trainers if t.plan.name == "clahe")
        steps = [(0.08, "SIGKILL trainer raw/rank1, restart it", lambda: self.restart_trainer(raw1)),
                 (0.15, "SIGKILL the daemon, restart it on the same socket", lambda: self.restart_daemon(sock, overrides)),
                 (0.60, "SIGKILL trainer clahe/rank0, restart it", lambda: self.restart_trainer(clahe0))]
        for fraction, what, action in steps:
            if not self.wait_for_progress(what, fraction * duration):
                return
            action()
            self.note(what)
        self.wait_for_progress("the end", duration)

    def restart_trainer(self, trainer: Trainer) -> None:
        trainer.sigkill()
        trainer.start({**self.env, "LOCAL_WORLD_SIZE": str(trainer.plan.world_size)})

    def restart_daemon(self, sock: Path, overrides: list[str]) -> None:
        try:
            self.daemon_counters.append(request("status", sock, timeout=10))
        except Exception as exc:  # counted as an error below; the kill goes ahead
            self.errors.append(f"status before the daemon kill failed: {exc}")
        self.daemon.proc.kill()
        self.daemon.proc.wait()
        self.start_daemon(sock, overrides)

    # ---- report

    def report(self, spec, plans, bad, results, samples: list[Sample], ending: dict[str, Any], random_faults,
               object_gets: int, bad_gets: int) -> dict[str, Any]:
        by_mode: dict[str, int] = {}
        for r in random_faults:
            by_mode[r.fault] = by_mode.get(r.fault, 0) + 1
        leak = leak_figures(samples, self.daemon_starts[-1], self.minutes)
        totals = {k: sum(s.get(k, 0) for s in self.daemon_counters) for k in ("retries", "gets", "quarantined")}
        stop_code, traceback_lines, status = ending["exit_code"], ending["tracebacks"], ending["status"]
        content_ok = all(r["lost"] == r["duplicated"] == r["wrong_pixels"] == r["mislabelled"] ==
                         r["bad_fields_delivered"] == 0 and r["epochs_complete"] > 0 for r in results.values())
        judged = leak["judged"]
        leak_ok = not judged or (leak["daemon_rss_growth_pct"] < RSS_GROWTH_LIMIT_PCT
                                 and leak["daemon_fds_growth"] <= FD_GROWTH_LIMIT)
        # Exactly the always-bad fields were ever quarantined, by whichever daemon life met them first.
        quarantine_ok = ending["quarantined_in_run"] == sorted(bad)
        passed = (content_ok and leak_ok and quarantine_ok and not self.errors and stop_code == 0
                  and traceback_lines == 0)
        return {
            "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
            "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - self.now())),
            "wall_s": round(self.now(), 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load1_min": min((s.load1 for s in samples), default=None),
                        "load1_max": max((s.load1 for s in samples), default=None)},
            "setup": {"minutes": self.minutes, "fields": spec.field_count, "image": f"5 x {self.size} x {self.size} uint16",
                      "fault_rate": self.fault_rate, "random_faults": list(RANDOM_FAULTS), "stall_s": STALL_S,
                      "read_timeout_s": READ_TIMEOUT_S, "batch_size": BATCH, "seed": self.seed,
                      "always_bad": {field_id: mode for field_id, mode in bad.items()},
                      "jobs": {p.name: {"world_size": p.world_size, "cache_size": p.cache_size, "options": p.options}
                               for p in plans}},
            "events": [asdict(e) for e in self.events],
            "daemon_restarts": len(self.daemon_starts) - 1,
            "trainer_restarts": sum(t.kills for t in self.trainers),
            "trainers": {t.name: {"starts": t.starts, "sigkills": t.kills,
                                  "reconnects": max((r["reconnects"] for r in read_records(t.record)), default=0)}
                         for t in self.trainers},
            "faults_injected": by_mode,
            "object_gets": object_gets,
            "always_bad_gets": bad_gets,
            "daemon_counters": totals,
            "quarantined_at_end": {j["job"]: sorted(q["field"] for q in j["quarantined"]) for j in status["jobs"]},
            "quarantined_in_run": ending["quarantined_in_run"],
            "results": results,
            **leak,
            "daemon_tracebacks": traceback_lines,
            "daemon_exit_code": stop_code,
            "errors": self.errors,
            "samples": [asdict(s) for s in samples],
            "verdict": "pass" if passed else "fail",
        }


def leak_figures(samples: list[Sample], last_start: float, minutes: float) -> dict[str, Any]:
    """Daemon RSS and fds from the restarted daemon's warm state (a fifth into its life) to the end: the median
    of the first and of the last few samples of that stretch."""
    life = [s for s in samples if s.t >= last_start]
    if len(life) < 6:
        return {"judged": False, "daemon_rss_growth_pct": None, "daemon_fds_growth": None}
    warm = [s for s in life if s.t >= last_start + (life[-1].t - last_start) / 5]
    head, tail = warm[:3], warm[-3:]
    rss0, rss1 = statistics.median(s.daemon_rss for s in head), statistics.median(s.daemon_rss for s in tail)
    fds0, fds1 = statistics.median(s.daemon_fds for s in head), statistics.median(s.daemon_fds for s in tail)
    trainer_rss = {}
    for name in sorted({k for s in warm for k in s.trainer_rss}):
        values = [s.trainer_rss[name] for s in warm if name in s.trainer_rss]
        fds = [s.trainer_fds[name] for s in warm if name in s.trainer_fds]
        trainer_rss[name] = {"first_mb": round(values[0] / 2**20, 1), "last_mb": round(values[-1] / 2**20, 1),
                             "fds": [fds[0], fds[-1]]}
    return {
        "judged": minutes >= LEAK_JUDGED_FROM_MINUTES,
        "leak_window_s": [head[0].t, tail[-1].t],
        "daemon_rss_mb": [round(rss0 / 2**20, 1), round(rss1 / 2**20, 1)],
        "daemon_rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "daemon_rss_peak_mb": round(max(s.daemon_rss for s in life) / 2**20, 1),
        "daemon_fds": [fds0, fds1],
        "daemon_fds_growth": fds1 - fds0,
        "trainer_rss": trainer_rss,
    }


# ---------------------------------------------------------------------------------------------------------
# Markdown


def markdown(r: dict[str, Any], json_name: str) -> str:
    s = r["setup"]
    lines = [
        "# Soak: what trainers received, judged by its pixels", "",
        f"Generated by `{r['command']}` on {r['started_utc']} in {r['wall_s']:.0f} s; every number below is from "
        f"that run (`{json_name}` beside this file has all of it, with the samples). Verdict: **{r['verdict']}**.", "",
        f"- Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, Python {r['machine']['python']}. It is "
        f"shared with other work: the 1-minute load average ranged {r['machine']['load1_min']:.1f}–"
        f"{r['machine']['load1_max']:.1f} during the run.",
        f"- Data: {s['fields']} synthetic fields ({s['image']}, real cpg0000 key names) on moto's S3 behind "
        f"tests/faultproxy.py; batch size {s['batch_size']}.",
        f"- Jobs: " + "; ".join(f"`{name}` {j['world_size']} rank(s), cache {j['cache_size']} fields, "
                                f"{_options(j['options'])}" for name, j in s["jobs"].items()) + ".",
        f"- Faults: {s['fault_rate']:.0%} of object GETs get one of {', '.join(s['random_faults'])} (stalls hold "
        f"{s['stall_s']:g} s, the read timeout is {s['read_timeout_s']:g} s); always bad: "
        + ", ".join(f"`{f}` ({m})" for f, m in s["always_bad"].items()) + ". Injected at random: "
        + ", ".join(f"{m} {c}" for m, c in sorted(r["faults_injected"].items())) + f" of {r['object_gets']} object "
        f"GETs ({r['always_bad_gets']} of them to the always-bad objects).",
        "- Events: " + "; ".join(f"{e['t']:.0f} s {e['what']}" for e in r["events"]) + ".", "",
        "Each trainer records a digest of every field's pixels it received (and, raw, the plate/well/site/channel "
        "signature in them); `bench/delivery.py` maps them to the source fields decoded independently "
        "(tifffile, numpy, OpenCV CLAHE) and counts per complete epoch over all ranks. Substitutes for the "
        "quarantined fields are expected extra deliveries, not duplicates.", "",
        "| job | epochs complete | fields received | lost | duplicated | wrong pixels | mislabelled | bad fields delivered | quarantined at end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    quarantined = {job.split("-")[1]: fields for job, fields in r["quarantined_at_end"].items() if job.count("-") >= 2}
    for name, v in r["results"].items():
        lines.append(f"| {name} | {v['epochs_complete']} | {v['fields_delivered']} | {v['lost']} | {v['duplicated']} | "
                     f"{v['wrong_pixels']} | {v['mislabelled']} | {v['bad_fields_delivered']} | "
                     f"{len(quarantined.get(name, []))} |")
    lines += ["", "Trainers: " + "; ".join(f"{k} started {v['starts']}×, reconnected {v['reconnects']}× after "
                                         f"the daemon restart" for k, v in r["trainers"].items()) + ".",
              "", f"Daemon restarts {r['daemon_restarts']}, trainer restarts {r['trainer_restarts']}; daemon "
                  f"retries {r['daemon_counters']['retries']}, tracebacks in its log {r['daemon_tracebacks']}, "
                  f"exit code at the end {r['daemon_exit_code']}.", ""]
    lines += [f"Fields quarantined over the run (every daemon life, from its log): "
              + (", ".join(f"`{f}`" for f in r["quarantined_in_run"]) or "none")
              + (": exactly the always-bad ones." if r["quarantined_in_run"] == sorted(s["always_bad"])
                 else f"; expected exactly {', '.join(sorted(s['always_bad']))}.")
              + " (`quarantined at end` counts what the restarted daemon's jobs held when the stop was requested: "
                "a bad field met only before the daemon restart is not among them.)", ""]
    if r.get("daemon_rss_mb"):
        judged = "" if r["judged"] else f" (not judged: runs under {LEAK_JUDGED_FROM_MINUTES:g} min are too short)"
        lines += [f"Restarted daemon from {r['leak_window_s'][0]:.0f} s to {r['leak_window_s'][1]:.0f} s{judged}: RSS "
                  f"{r['daemon_rss_mb'][0]} → {r['daemon_rss_mb'][1]} MB ({r['daemon_rss_growth_pct']:+.2f} %, limit "
                  f"< {RSS_GROWTH_LIMIT_PCT:g} %), peak {r['daemon_rss_peak_mb']} MB; open fds {r['daemon_fds'][0]:g} → "
                  f"{r['daemon_fds'][1]:g} (limit +{FD_GROWTH_LIMIT}). Trainers' RSS (first → last sample): "
                  + ", ".join(f"{k} {v['first_mb']} → {v['last_mb']} MB, fds {v['fds'][0]} → {v['fds'][1]}"
                            for k, v in r["trainer_rss"].items()) + ".", ""]
    if r["errors"]:
        lines += ["Errors:", ""] + [f"- {e}" for e in r["errors"]] + [""]
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    if not options.get("illum") and not options.get("clahe"):
        return "raw pixels"
    return "illum + CLAHE bins 65536 (OpenCV uint16)"


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fields", type=int, default=48, help="synthetic fields (a multiple of 8)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--fault-rate", type=float, default=0.05, help="share of object GETs that get a random fault")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="directory for soak.json and soak.md")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (data, records, logs)")
    ap.add_argument("--consume", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.consume:
        return consume(json.loads(args.consume))
    work = Path(tempfile.mkdtemp(prefix="pfsoak-", dir="/tmp"))
    soak = Soak(args.minutes, args.fields, args.size, args.fault_rate, args.seed, work)
    try:
        report = soak.run()
    finally:
        for t in soak.trainers:
            if t.proc is not None and t.proc.poll() is None:
                t.proc.kill()
                t.proc.wait()
        if soak.daemon is not None and soak.daemon.proc is not None and soak.daemon.proc.poll() is None:
            soak.daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "soak.md").write_text(markdown(report, "soak.json"))
    summary = {name: {k: v[k] for k in ("epochs_complete", "lost", "duplicated", "wrong_pixels", "mislabelled")}
               for name, v in report["results"].items()}
    print(json.dumps({"verdict": report["verdict"], "results": summary, "daemon_rss_growth_pct":
                      report["daemon_rss_growth_pct"], "daemon_fds_growth": report["daemon_fds_growth"],
                      "errors": report["errors"]}, indent=1))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    raise SystemExit(main())
