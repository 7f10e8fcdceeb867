"""A hung event loop is restarted: the watchdog is fed from the loop, so a blocked loop stops the pings; the
supervisor (systemd: WatchdogSec=, Restart=on-failure) kills it with SIGABRT and starts it again, and an
attached trainer reattaches and finishes its epoch with exactly the pixels it should get.

No systemd runs here: `Supervisor` does what systemd does with the unit's settings, on the same sd_notify
datagrams, with real signals and processes. The loop is blocked from inside, as a bug would block it, by
the test-only `debug.block_loop_on_sigusr2_s`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.delivery import SourceFields, Tally
from prefetchd.channels import DEFAULT_CHANNELS
from prefetchd.client import attach
from prefetchd.shm.arena import read_owner_pid

from conftest import REPO_ROOT, _daemon_env, shm_segments, socket_accepts, wait_until

WATCHDOG_S = 4.0   # WatchdogSec: the daemon pings every min(1 s, WatchdogSec / 2); a loaded machine stays well inside
RAW = {"illum": False, "clahe": False, "rescale": False}


class Supervisor(threading.Thread):
    """systemd for one Type=notify unit with WatchdogSec=WATCHDOG_S and Restart=on-failure."""

    def __init__(self, workdir: Path, overrides: list[str]):
        super().__init__(name="supervisor", daemon=True)
        self.workdir, self.overrides = workdir, overrides
        self.socket = workdir / "p.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(workdir / "notify"))
        self.notify.settimeout(0.1)
        self.procs: list[subprocess.Popen] = []
        self.pings: list[tuple[int, float]] = []     # (pid, when) of every WATCHDOG=1
        self.aborted: list[tuple[int, float]] = []   # (pid, seconds since its last ping) of every watchdog kill
        self.stopping = threading.Event()

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[-1]

    def start_unit(self) -> None:
        env = _daemon_env({"NOTIFY_SOCKET": str(self.workdir / "notify"), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))})
        command = [sys.executable, "-m", "prefetchd", "serve", "--socket", str(self.socket)]
        for item in self.overrides:
            command += ["--set", item]
        with open(self.workdir / "daemon.log", "ab") as log:
            self.procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def run(self) -> None:
        self.start_unit()
        last = time.monotonic()
        while not self.stopping.is_set():
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                message = ""
            now = time.monotonic()
            if "WATCHDOG=1" in message or "READY=1" in message:
                last = now
                if "WATCHDOG=1" in message:
                    self.pings.append((self.proc.pid, now))
            if self.proc.poll() is None and now - last > WATCHDOG_S:
                self.aborted.append((self.proc.pid, now - last))
                self.proc.send_signal(signal.SIGABRT)    # systemd's WatchdogSignal
                self.proc.wait(30)
            if self.proc.poll() is not None and not self.stopping.is_set():
                self.start_unit()                        # Restart=on-failure
                last = time.monotonic()

    def stop(self) -> int:
        self.stopping.set()
        self.join(30)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.notify.close()
        return code

    @property
    def log(self) -> str:
        return (self.workdir / "daemon.log").read_text(errors="replace")


def test_a_blocked_event_loop_stops_the_watchdog_and_the_restarted_daemon_serves_the_reattached_trainer(s3, synthetic):
    workdir = Path(tempfile.mkdtemp(prefix="pfw-", dir="/tmp"))
    before = shm_segments()
    supervisor = Supervisor(workdir, [f"s3.endpoint_url={synthetic.endpoint_url}", f"cache_dir={workdir / 'cache'}",
                                      "debug.block_loop_on_sigusr2_s=600"])
    supervisor.start()
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    n = synthetic.spec.field_count
    tally = Tally(world_size=1, batches_per_epoch=n // 4, fields=source.ids)
    try:
        wait_until(lambda: socket_accepts(supervisor.socket), 60, "the daemon to listen")
        first = supervisor.proc
        with attach(synthetic.dataset, batch_size=4, socket=supervisor.socket, job="watched", cache_size=n,
                    reconnect_timeout_s=120, **RAW) as stream:
            for index in range(2):
                batch = stream.next(0, index)
                tally.add(0, 0, index, batch.ids, [source.identify(f) for f in batch.images])
            wait_until(lambda: sum(pid == first.pid for pid, _ in supervisor.pings) >= 3, 30, "regular pings")
            os.kill(first.pid, signal.SIGUSR2)  # the loop blocks for 600 s, as a bug would block it
            blocked_at = time.monotonic()
            for index in range(2, n // 4):  # waits through the watchdog kill and the restart, then reattaches
                batch = stream.next(0, index)
                tally.add(0, 0, index, batch.ids, [source.identify(f) for f in batch.images])
            assert stream.reconnects == 1
            assert stream.status()["pid"] == supervisor.proc.pid != first.pid
    finally:
        code = supervisor.stop()
        for proc in supervisor.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    verdict = tally.judge()
    assert verdict["epochs_complete"] == 1
    assert (verdict["lost"], verdict["duplicated"], verdict["wrong_pixels"], verdict["mislabelled"]) == (0, 0, 0, 0), \
        verdict["examples"]
    # The pings stopped with the loop: none from the first daemon after the block; then the watchdog fired.
    assert [pid for pid, _ in supervisor.aborted] == [first.pid], supervisor.aborted
    assert not [t for pid, t in supervisor.pings if pid == first.pid and t > blocked_at + 0.5]
    assert first.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in supervisor.log and "_block_loop" in supervisor.log  # faulthandler's stack
    assert code == 0
    ours = {p.pid for p in supervisor.procs}
    assert {s for s in shm_segments() - before if read_owner_pid(s) in ours} == set()
    shutil.rmtree(workdir, ignore_errors=True)
