"""The client side when the daemon does not answer: a paused daemon (SIGSTOP), a full listen backlog and a
storm of connects give one-line errors, never a traceback or a raw OSError, and a stream whose call timed
out recovers once the daemon answers again, losing and duplicating nothing (judged from the pixels)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from bench.delivery import SourceFields, Tally
from prefetchd.channels import DEFAULT_CHANNELS
from prefetchd.client import attach
from prefetchd.control import ControlConnection, request
from prefetchd.errors import DaemonTimeout, PrefetchdError

from conftest import REPO_ROOT, wait_until

RAW = {"illum": False, "clahe": False, "rescale": False}


@contextmanager
def paused(d):
    """The daemon's process stopped (SIGSTOP) for the block: alive, socket bound, answering nothing."""
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefetchd", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)


def test_status_and_stop_against_a_paused_daemon_print_one_line(daemon):
    d = daemon()
    with paused(d):
        for command in ("status", "stop"):
            result = run_cli(command, "--socket", str(d.socket), "--timeout", "1")
            assert result.returncode == 1, result
            assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
            assert f"prefetchd {command}: error: the prefetchd daemon at {d.socket} did not answer" in result.stderr
            assert "paused, hung or overloaded" in result.stderr
    # the stop that timed out was still delivered: once resumed, the daemon drains and exits 0
    assert d.proc.wait(timeout=30) == 0
    d.stopped = True


def test_a_stream_whose_call_timed_out_recovers_when_the_daemon_resumes(daemon, synthetic):
    d = daemon()
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    n = synthetic.spec.field_count
    tally = Tally(world_size=1, batches_per_epoch=n // 4, fields=source.ids)

    def receive(batch) -> None:
        tally.add(0, batch.epoch, batch.index, batch.ids, [source.identify(field) for field in batch.images])

    with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=n, timeout=1.5,
                reconnect_timeout_s=30, **RAW) as stream:
        receive(stream.next(0, 0))
        with paused(d):
            with pytest.raises(DaemonTimeout, match=r"did not answer 'next' within 1.5 s") as info:
                stream.next(0, 1)
            assert "\n" not in str(info.value)
            with pytest.raises(DaemonTimeout):  # still paused: the reconnect times out the same way
                stream.next(0, 1)
        for batch in stream.epoch(0, start_batch=1):
            receive(batch)
        assert stream.reconnects == 1
        assert stream.status()["pid"] == d.proc.pid
    verdict = tally.judge()
    assert verdict["epochs_complete"] == 1
    assert (verdict["lost"], verdict["duplicated"], verdict["wrong_pixels"], verdict["mislabelled"]) == (0, 0, 0, 0), \
        verdict["examples"]


def fill_backlog(path) -> list[socket.socket]:
    """Connect without accepting until the kernel refuses: the listen backlog of a paused daemon is full."""
    held = []
    for _ in range(10_000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return held
        held.append(s)
    pytest.fail("the backlog never filled")


def test_a_full_backlog_is_a_one_line_timeout_not_blocking_io_error(daemon, synthetic):
    d = daemon()
    with paused(d):
        flood = fill_backlog(d.socket)
        try:
            with pytest.raises(DaemonTimeout, match="accepted no connection within 1 s"):
                attach(synthetic.dataset, batch_size=2, socket=d.socket, timeout=1, **RAW)
            with pytest.raises(DaemonTimeout):
                request("ping", d.socket, timeout=0.5)
        finally:
            for s in flood:
                s.close()
    wait_until(lambda: request("ping", d.socket, timeout=5)["ok"], 30, "the daemon to answer again")


def test_a_connect_storm_gets_answers_or_one_line_errors(daemon):
    d = daemon()
    clients = 300
    start = threading.Barrier(clients)
    outcomes: list[object] = []

    def ping() -> None:
        start.wait()
        try:
            with ControlConnection(d.socket, timeout=20) as conn:
                outcomes.append(conn.request("ping")["ok"])
        except PrefetchdError as exc:
            outcomes.append(exc.code)
        except BaseException as exc:  # what this test is about: nothing raw may escape
            outcomes.append(exc)

    threads = [threading.Thread(target=ping) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    raw = [o for o in outcomes if isinstance(o, BaseException)]
    assert not raw, raw[:3]
    assert len(outcomes) == clients and outcomes.count(True) == clients, sorted(set(map(str, outcomes)))
    assert request("ping", d.socket)["ok"]


HOLDER = """
import sys
from prefetchd.client import attach
s = attach(sys.argv[2], batch_size=4, socket=sys.argv[1], job=sys.argv[3], cache_size=12, prefetch_factor=1,
           illum=False, clahe=False, rescale=False)
s.next(0, 0)
print("READY", flush=True)
s.next(0, 5)  # every GET stalls now: waits here until killed
"""


def test_a_trainer_restarted_at_once_gets_its_rank_back(daemon, synthetic, s3):
    """torchrun restarts a killed worker within seconds. The daemon notices the old connection go even while
    it waits inside `next` for that rank's batch, so the new attach gets the rank at once (no wait, no
    rank_taken)."""
    from faultproxy import FaultProxy

    from conftest import _daemon_env

    with FaultProxy(upstream=s3.endpoint_url, seed=5) as proxy:
        d = daemon("s3.read_timeout_s=3", endpoint_url=proxy.url)
        job = f"restarted-{os.getpid()}"
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d.socket), synthetic.dataset, job],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=_daemon_env(None))
        try:
            assert holder.stdout.readline().strip() == "READY"
            proxy.add_rule("stall", stall_s=30)
            wait_until(lambda: request("status", d.socket)["inflight_requests"] > 0, 30, "a GET to stall")
            holder.kill()
            holder.wait(timeout=30)
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.stdout.close()
        # The stall holds for 30 s more: only watching the connection tells the daemon the rank is free.
        wait_until(lambda: f"left while rank 0 of job {job} waited for a batch" in d.log, 10,
                   "the daemon to notice the killed rank")
        proxy.clear()
        with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=job, cache_size=12, prefetch_factor=1,
                    **RAW) as stream:
            source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
            batch = stream.next(0, 5)
            assert [source.identify(f).field for f in batch.images] == batch.ids


def test_two_live_processes_with_the_same_rank_still_get_rank_taken(daemon, synthetic):
    d = daemon()
    opts = dict(batch_size=2, socket=d.socket, job=f"twice-{os.getpid()}", cache_size=12, **RAW)
    with attach(synthetic.dataset, **opts):
        with pytest.raises(PrefetchdError, match="rank 0 of job twice-.* is already attached") as info:
            attach(synthetic.dataset, **opts)
        assert info.value.code == "rank_taken"
