"""The service as systemd runs it: the unit passes systemd-analyze, sd_notify READY/WATCHDOG reach a
notify socket the test owns, and SIGHUP reloads the config without dropping attached jobs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.shm.arena import read_owner_pid

from conftest import REPO_ROOT, Daemon, _daemon_env, _shut_down, shm_segments, wait_until

UNIT = REPO_ROOT / "systemd" / "prefetchd.service"
RAW = {"illum": False, "clahe": False, "rescale": False}
analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")
def test_unit_security_score_is_at_most_3():
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    line = [l for l in result.stdout.splitlines() if "Overall exposure level" in l]
    assert line, result.stdout + result.stderr
    score = float(line[0].split(":")[1].split()[0])
    assert score <= 3.0, result.stdout


@pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path):
    # verify insists that ExecStart exists: point it at this interpreter, as an install would.
    text = UNIT.read_text().replace("/usr/local/bin/prefetchd", f"{os.path.realpath(sys.executable)} -m prefetchd")
    unit = tmp_path / "prefetchd.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RuntimeDirectory=prefetchd",
                   "StateDirectory=prefetchd", "CacheDirectory=prefetchd", "User=prefetchd", "Group=prefetchd",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                   "ExecReload=/bin/kill -HUP $MAINPID"):
        assert needed in text


def _recv(sock: socket.socket, deadline: float) -> str | None:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(4096).decode()
    except socket.timeout:
        return None


def test_ready_after_bind_then_periodic_watchdog_then_stopping(daemon):
    workdir = Path(tempfile.mkdtemp(prefix="pfn-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(str(workdir / "notify"))
        d = daemon(env={"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "400000"})
        deadline = time.monotonic() + 20
        first = _recv(notify, deadline)
        assert first is not None and "READY=1" in first, first
        assert f"STATUS=listening on {d.socket}" in first  # sent after the bind, naming the bound socket
        stamps = []
        while len(stamps) < 4 and time.monotonic() < deadline:
            msg = _recv(notify, deadline)
            if msg == "WATCHDOG=1":
                stamps.append(time.monotonic())
        assert len(stamps) == 4, "fewer than 4 WATCHDOG=1 pings in 20 s"
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert max(gaps) < 0.4 * 1.5, gaps  # WatchdogSec/2 = 0.2 s, with slack: well inside the 0.4 s timeout
        d.stop()
        messages = []
        while (msg := _recv(notify, time.monotonic() + 5)) is not None:
            messages.append(msg)
            if "STOPPING=1" in msg:
                break
        assert any("STOPPING=1" in m for m in messages)
    finally:
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- SIGHUP ---------------------------------------------------------------------------------


def _serve_with_config(config: Path, workdir: Path) -> Daemon:
    sock = workdir / "p.sock"
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefetchd", "serve", "--config", str(config),
                                 "--socket", str(sock)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=_daemon_env(None), start_new_session=True)
    handle = Daemon(socket=sock, proc=proc, log_path=log_path, workdir=workdir)
    handle.wait_ready()
    return handle


def test_sighup_reloads_safe_keys_and_keeps_attached_jobs(s3, synthetic):
    before = shm_segments()
    workdir = Path(tempfile.mkdtemp(prefix="pfh-", dir="/tmp"))
    config = workdir / "config.yaml"
    tree = {"log_level": "info", "cache_dir": str(workdir / "cache"), "s3": {"endpoint_url": s3.endpoint_url},
            "defaults": {"cache_size": 24}, "decode": {"workers": 2}}
    config.write_text(yaml.safe_dump(tree))
    d = _serve_with_config(config, workdir)
    try:
        with attach(synthetic.dataset, batch_size=2, socket=d.socket, job="before-hup", **RAW) as stream:
            batches = iter(stream.epoch(0))
            first = next(batches)
            tree.update(log_level="debug", defaults={"cache_size": 30}, decode={"workers": 1})
            config.write_text(yaml.safe_dump(tree))
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded config" in d.log, 20, "the reload log line")
            assert "defaults.cache_size" in d.log and "log_level" in d.log
            assert "decode.workers changed but need a restart" in d.log
            rest = [first] + list(batches)  # the attached job keeps streaming on the same connection
            assert sum(len(b.ids) for b in rest) == synthetic.spec.field_count
            with attach(synthetic.dataset, batch_size=2, socket=d.socket, job="after-hup", **RAW) as fresh:
                next(iter(fresh.epoch(0)))
                jobs = {j["job"]: j for j in request("status", d.socket)["jobs"]}
            assert jobs["before-hup"]["cache_size"] == 24 and jobs["after-hup"]["cache_size"] == 30
        # a broken file is refused and the daemon keeps running with what it had
        config.write_text("defaults: {cache_size: -3}\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in d.log, 20, "the failed-reload log line")
        assert request("ping", d.socket)["ok"]
        assert "DEBUG" in d.log  # log_level=debug took effect live
    finally:
        problem = _shut_down(d)
    assert problem is None, problem
    # only this daemon's segments: other daemons may run on the same machine
    assert {name for name in shm_segments() - before if read_owner_pid(name) == d.proc.pid} == set()
