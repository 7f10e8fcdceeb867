"""Process accounting for the benchmark: memory and CPU of a process tree, the latency proxy's counters, the
machine's busy time, py-spy profile summaries and the machine description."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path


class TreeSampler:
    """Samples RSS and PSS summed over a process and all its descendants, every `period` s."""

    def __init__(self, pid: int, period: float = 0.5):
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int, int]] = []  # t, rss, pss, processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            rss = pss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += info.pss
            self.samples.append((time.monotonic() - t0, rss, pss, len(procs)))
            self._stop.wait(self.period)

    def peak(self) -> dict:
        if not self.samples:
            return {"rss_peak": 0, "pss_peak": 0, "processes": 0}
        return {"rss_peak": max(s[1] for s in self.samples), "pss_peak": max(s[2] for s in self.samples),
                "processes": max(s[3] for s in self.samples)}


def tree_cpu(pid: int) -> float:
    """user+sys CPU seconds of a live process and its live descendants (plus reaped children)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for i, p in enumerate(procs):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + (t.children_user + t.children_system if i == 0 else 0.0)
    return total


def proc_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def proxy_stats(port: int) -> dict:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data)


def proxy_delta(port: int, before: dict) -> tuple[dict, dict]:
    now = proxy_stats(port)
    return {k: now[k] - before.get(k, 0) for k in now}, now


def busy_cpu(t) -> float:
    return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


GENERIC = ("_bootstrap", "_bootstrap_inner", "Thread.run", "_worker (thread.py)", "_WorkItem.run", "<module>",
           "_run_module_as_main", "_run_code", "main (", "run (", "run_forever", "_run_once", "Handle._run",
           "run_until_complete", "serve (")


def summarize_profile(path: str, top: int = 14) -> dict:
    """From py-spy's raw (collapsed) output: share of on-CPU samples per thread group, per function (self =
    leaf frame) and inclusive (generic threading/asyncio frames dropped)."""
    p = Path(path)
    if not p.exists():
        return {}
    counts: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in p.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        threads["thread pool (decode/illum)" if "_worker (" in stack else "event loop + other threads"] += n
        seen = set()
        key = ""
        for fr in frames[1:]:  # first frame is the thread
            name = fr.split(" (")[0]
            where = fr[fr.find("(") + 1:fr.rfind(":")] if "(" in fr else ""
            key = f"{name} ({Path(where).name})" if where else name
            if key not in seen and not any(g in key for g in GENERIC):
                seen.add(key)
                counts[key] += n
        leaf[key] += n
    if not total:
        return {}
    return {"samples": total,
            "threads": [(k, v / total) for k, v in threads.most_common()],
            "self": [(k, v / total) for k, v in leaf.most_common(top)],
            "inclusive": [(k, v / total) for k, v in counts.most_common(top)]}


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1e6, 1)
    versions = {}
    for mod in ("prefetchd", "torch", "cv2", "tifffile", "boto3", "botocore", "aiobotocore", "numpy", "uvloop",
                "s3torchconnector", "psutil"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
    for exe, args in (("weed", ["version"]), ("rclone", ["version"]), ("py-spy", ["--version"])):
        with contextlib.suppress(Exception):
            versions[exe] = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    info["versions"] = versions
    return info
