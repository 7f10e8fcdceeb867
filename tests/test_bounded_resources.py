"""Bounded per-peer resources: request-derived sizes checked before anything is planned or allocated, caps on
control connections per peer and in total, idle connections closed (but never a rank waiting for its batch),
and a daemon log line for every failed attach."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc

import pytest

from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.errors import PrefetchdError
from prefetchd.options import MAX_WORLD_SIZE
from prefetchd.schedule import schedule

from conftest import wait_until
from faultproxy import FaultProxy

RAW = {"illum": False, "clahe": False, "rescale": False}


def connect(d) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(d.socket))
    return s


def ask(s: socket.socket, op: str, **fields) -> dict:
    s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
    return json.loads(s.makefile("rb").readline())


# ---- request-derived sizes --------------------------------------------------------------------------------


def test_a_ranks_schedule_costs_what_the_rank_reads_not_what_world_size_says():
    schedule(48, 0, 0, 0, 1, 4)  # the epoch's permutation, cached: not what is measured
    tracemalloc.start()
    try:
        order = schedule(48, 0, 0, 5, 10**7, 4)   # 10^7 ranks over 48 fields: this rank reads one field
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(order) == 1 and peak < 1 << 20, peak  # padding the permutation to 10^7 entries took 80 MB


def test_a_huge_world_size_is_refused_at_attach_and_the_daemon_keeps_serving(daemon, synthetic):
    d = daemon()
    with connect(d) as s:
        reply = ask(s, "attach", dataset=synthetic.dataset, batch_size=4, rank=0, world_size=10**8, job="wedge")
    assert reply["ok"] is False and reply["code"] == "bad_config", reply
    assert f"world_size must be an integer >= 1 and <= {MAX_WORLD_SIZE}, got 100000000" == reply["error"]
    status = request("status", d.socket, timeout=10)
    assert status["jobs"] == [] and status["shm_bytes"] == 0
    wait_until(lambda: "attach refused (bad_config) for rank 0 of job wedge" in d.log, 10, "the refusal's log line")


def test_every_failed_attach_has_a_daemon_log_line(daemon, synthetic):
    d = daemon()
    failures = [
        ("dataset", dict(dataset="JUMPS3MultiView:bucket=no-such-bucket-here", job="nobucket")),
        ("option", dict(dataset=synthetic.dataset, job="badprefetch", prefetch_factor=10**9)),
        ("rank", dict(dataset=synthetic.dataset, job="badrank", rank=3, world_size=2)),
    ]
    for what, kwargs in failures:
        dataset = kwargs.pop("dataset")
        with pytest.raises(PrefetchdError):
            attach(dataset, batch_size=4, socket=d.socket, cache_size=12, **RAW, **kwargs)
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="taken", cache_size=12, **RAW):
        with pytest.raises(PrefetchdError, match="already attached"):
            attach(synthetic.dataset, batch_size=4, socket=d.socket, job="taken", cache_size=12, **RAW)
    for job in ("nobucket", "badprefetch", "badrank", "taken"):
        wait_until(lambda: f"of job {job} from pid" in d.log, 10, f"a log line for the failed attach of {job}")
    refused = [line for line in d.log.splitlines() if "attach refused" in line]
    assert len(refused) == 4, refused
    assert any("(rank_taken) for rank 0 of job taken" in line for line in refused), refused


# ---- connections ------------------------------------------------------------------------------------------


def test_control_connections_are_capped_per_peer_and_a_freed_one_is_reusable(daemon):
    d = daemon("control.max_connections_per_peer=5")
    held = [connect(d) for _ in range(5)]
    try:
        for s in held:
            assert ask(s, "ping")["ok"]
        with connect(d) as extra:
            reply = ask(extra, "ping")
        assert reply["ok"] is False and reply["code"] == "too_many_connections", reply
        assert "5 control connections open (control.max_connections_per_peer=5)" in reply["error"]
        assert "\n" not in reply["error"]
        held.pop().close()

        statuses = []

        def one_more_admitted() -> bool:
            with connect(d) as s:
                reply = ask(s, "status")
            statuses.append(reply)
            return reply["ok"]

        wait_until(one_more_admitted, 10, "a connection slot to free up")
        status = statuses[-1]
        assert status["connections"] == len(held) + 1, status
        assert status["connections_refused"] == len(statuses), status  # the extra one, and retries while it closed
    finally:
        for s in held:
            s.close()
    assert "refused control connection from pid" in d.log and "max_connections_per_peer=5" in d.log


def test_control_connections_are_capped_in_total(daemon):
    d = daemon("control.max_connections=3", "control.max_connections_per_peer=100")
    held = [connect(d) for _ in range(3)]
    try:
        for s in held:
            assert ask(s, "ping")["ok"]
        with connect(d) as extra:
            reply = ask(extra, "status")
        assert reply["code"] == "too_many_connections" and "control.max_connections=3" in reply["error"], reply
    finally:
        for s in held:
            s.close()


def test_an_idle_connection_is_closed_but_a_rank_waiting_for_a_slow_fill_is_not(daemon, synthetic, s3):
    with FaultProxy(upstream=s3.endpoint_url, seed=11) as proxy:
        d = daemon("control.idle_timeout_s=1", "s3.read_timeout_s=20", endpoint_url=proxy.url)
        with attach(synthetic.dataset, batch_size=4, socket=d.socket, job="patient", cache_size=12,
                    prefetch_factor=0, **RAW) as stream:
            stream.next(0, 0)
            idle = connect(d)
            try:
                assert ask(idle, "ping")["ok"]
                wait_until(lambda: idle.recv(1) == b"", 30, "the daemon to close the idle connection")
            finally:
                idle.close()
            # Attached and silent for longer than the idle timeout (the idle one was closed meanwhile): still open.
            target = stream._conn  # the stream's own connection: it must not be replaced by a reconnect
            # The rank jumps past what the 12 slots hold: the next GET is one of batch 5's, fetched on demand.
            # It stalls 4 s, four times the idle timeout, and then breaks off; its retry succeeds.
            proxy.add_rule("stall", first_n=1, stall_s=4)
            batch = stream.next(0, 5)
            assert batch.waited_s >= 3 and len(batch.ids) == 4, batch.waited_s
            assert stream.reconnects == 0 and stream._conn is target
    assert d.log.count("closed a control connection") == 1, d.log


# ---- an endpoint that accepts and never answers -----------------------------------------------------------


@pytest.fixture
def black_hole():
    """A TCP endpoint that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (socket.timeout, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(10)
    for s in held:
        s.close()
    server.close()


def test_an_endpoint_that_never_answers_fails_attach_in_bounded_time_with_a_log_line(daemon, synthetic, black_hole):
    connect_s, read_s, retries = 1, 3, 5
    d = daemon(f"s3.connect_timeout_s={connect_s}", f"s3.read_timeout_s={read_s}", f"s3.retries={retries}",
               endpoint_url=black_hole)
    started = time.monotonic()
    with pytest.raises(PrefetchdError) as info:
        attach(synthetic.dataset, batch_size=4, socket=d.socket, job="hole", cache_size=12, **RAW)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert info.value.code == "timeout" and "\n" not in message, message
    assert f"did not answer a LIST of s3://{synthetic.bucket}/" in message and "check s3.endpoint_url" in message
    # One unretried LIST: connect + read timeout, not (retries + 1) × read timeout for every request.
    assert elapsed < (retries + 1) * read_s * 0.6, elapsed
    wait_until(lambda: "attach refused (timeout) for rank 0 of job hole" in d.log, 10, "the refusal's log line")
    assert "did not answer a LIST" in d.log
