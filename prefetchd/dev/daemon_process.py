"""Start a `prefetchd serve` subprocess and wait until it takes attaches (the demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefetchd.control import request
from prefetchd.errors import DaemonNotRunning, PrefetchdError


class DaemonProcess:
    def __init__(self, socket: Path, overrides: list[str] = (), *, log_path: Path | None = None,
                 env: dict[str, str] | None = None):
        self.socket = Path(socket)
        self.overrides = list(overrides)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        cmd = [sys.executable, "-m", "prefetchd", "serve", "--socket", str(self.socket)]
        for item in self.overrides:
            cmd += ["--set", item]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=self.env or os.environ.copy())
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                hint = f" (log: {self.log_path})" if self.log_path else ""
                raise PrefetchdError(f"prefetchd serve exited with code {self.proc.returncode} during startup{hint}")
            try:
                request("ping", self.socket, timeout=2.0)
                return
            except DaemonNotRunning:
                time.sleep(0.05)  # polling a condition with a deadline
        raise PrefetchdError(f"prefetchd serve did not answer on {self.socket} within {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
