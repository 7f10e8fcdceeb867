"""Bounded per-peer resources: request-derived sizes checked before anything is planned or allocated, caps on
control connections per peer and in total, idle connections closed (but never a rank waiting for its batch),
and a daemon log line for every failed attach."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from bench.delivery import SourceFields
from prefetchd.channels import DEFAULT_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.errors import PrefetchdError
from prefetchd.options import (MAX_BATCH_SIZE, MAX_CACHE_SIZE, MAX_EPOCH, MAX_LOCAL_WORLD_SIZE,
                               MAX_PREFETCH_FACTOR, MAX_WORLD_SIZE)
from prefetchd.quarantine import Quarantine
from prefetchd.schedule import schedule
from prefetchd.timeline import ORDERS_AHEAD, Timeline

from conftest import wait_until
from faultproxy import FaultProxy

RAW = {"illum": False, "clahe": False, "rescale": False}
PID = os.getpid()   # in job ids that get an arena: /dev/shm names are machine-wide, other test sessions run beside


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


class Streaming:
    """A legitimate job streaming in a thread the whole time, judging every field by its pixels: what hostile
    requests beside it must not disturb."""

    def __init__(self, d, synthetic, job: str):
        self.source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
        self.stream = attach(synthetic.dataset, batch_size=4, socket=d.socket, job=job, cache_size=12, **RAW)
        self.batches = 0
        self.wrong: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        epoch = 0
        try:
            while not self._stop.is_set():
                for batch in self.stream.epoch(epoch):
                    found = [self.source.identify(f).field for f in batch.images]
                    if found != batch.ids:
                        self.wrong.append(f"epoch {epoch} batch {batch.index}: {batch.ids} carried {found}")
                    self.batches += 1
                    if self._stop.is_set():
                        return
                epoch += 1
        except BaseException as exc:  # re-raised in the test by `check`
            self.error = exc

    def wait_for_more(self, batches: int, what: str) -> None:
        target = self.batches + batches
        wait_until(lambda: self.batches >= target or self.error is not None or not self._thread.is_alive(), 60, what)

    def check(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the streaming job did not finish its batch"
        assert self.error is None, repr(self.error)
        assert self.wrong == [] and self.batches > 0
        assert self.stream.reconnects == 0  # it never lost its connection
        self.stream.close()


def daemon_rss_bytes(d) -> int:
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_world_size_at_the_bound_costs_what_the_rank_reads_and_beyond_it_is_refused(daemon, synthetic):
    """Issue #16: attach(world_size=10**8) then `next` sat in np.resize for minutes (RSS 0.2 -> 5.7 GB) while
    every other client timed out. Now the largest accepted world size answers at once, its rank's schedule
    costs O(fields / world_size), and the job beside it keeps streaming exact pixels."""
    d = daemon()
    other = Streaming(d, synthetic, f"beside-huge-{PID}")
    try:
        other.wait_for_more(2, "the other job to stream")
        rss_before = daemon_rss_bytes(d)
        with attach(synthetic.dataset, batch_size=4, rank=MAX_WORLD_SIZE - 1, world_size=MAX_WORLD_SIZE,
                    socket=d.socket, job=f"huge-world-{PID}", cache_size=12, timeout=60, **RAW) as huge:
            assert MAX_WORLD_SIZE == 10**8 and huge.batches_per_epoch == 1
            for epoch in range(3):
                (batch,) = list(huge.epoch(epoch))   # one field per epoch: 24 fields over 10^8 ranks
                assert len(batch.ids) == 1
                assert other.source.identify(batch.images[0]).field == batch.ids[0]
            other.wait_for_more(2, "the other job to keep streaming beside the huge world")
            grew = daemon_rss_bytes(d) - rss_before
        # A schedule padded to 10^8 entries is 800 MB; the whole job here (arena included) is a few MB.
        assert grew < 64 << 20, f"the daemon grew by {grew / 2**20:.0f} MB"
        with connect(d) as s:
            reply = ask(s, "attach", dataset=synthetic.dataset, batch_size=4, rank=0, world_size=10**12, job="wedge")
        assert reply == {"ok": False, "code": "bad_config",
                         "error": f"world_size must be an integer >= 1 and <= {MAX_WORLD_SIZE}, got 1000000000000"}
        wait_until(lambda: "attach refused (bad_config) for rank 0 of job wedge" in d.log, 10, "the refusal's log line")
    finally:
        other.check()


# (the attach fields sent, the error code, what the one-line error says: the key and the accepted range)
HOSTILE_SIZES = [
    (dict(world_size=10**12), "bad_config", f"world_size must be an integer >= 1 and <= {MAX_WORLD_SIZE}, got 1000000000000"),
    (dict(world_size=0), "bad_config", f"world_size must be an integer >= 1 and <= {MAX_WORLD_SIZE}, got 0"),
    (dict(rank=5, world_size=2), "bad_config", "rank must be an integer >= 0 and <= 1, got 5"),
    (dict(rank=-1), "bad_config", "rank must be an integer >= 0 and <= 0, got -1"),
    (dict(batch_size=10**9), "bad_config", f"batch_size must be an integer >= 1 and <= {MAX_BATCH_SIZE}, got 1000000000"),
    (dict(batch_size=0), "bad_config", f"batch_size must be an integer >= 1 and <= {MAX_BATCH_SIZE}, got 0"),
    (dict(local_world_size=10**6), "bad_config",
     f"local_world_size must be an integer >= 1 and <= {MAX_LOCAL_WORLD_SIZE}, got 1000000"),
    (dict(seed=2**70), "bad_request", "field 'seed' of op 'attach' is out of range: integers must fit in 64 bits"),
    (dict(options={"cache_size": 10**18}), "bad_config",
     f"cache_size must be an integer >= 1 and <= {MAX_CACHE_SIZE}, got 1000000000000000000"),
    (dict(options={"cache_size": MAX_CACHE_SIZE}), "shm", "of shared memory but only"),
    (dict(options={"cache_size": 8}), "shm", "cache_size=8 fields cannot hold (prefetch_factor + 1) × batch_size"),
    (dict(options={"prefetch_factor": 10**9}), "bad_config",
     f"prefetch_factor must be an integer >= 0 and <= {MAX_PREFETCH_FACTOR}, got 1000000000"),
    (dict(options={"clahe": {"tile_grid": 1000}}), "bad_config", "clahe.tile_grid must be an integer >= 1 and <= 64"),
    (dict(options={"clahe": {"clip_limit": 1e308}}), "bad_config", "clahe.clip_limit must be > 0 and <= 65536"),
    (dict(options={"clahe": {"bins": 10**9}}), "bad_config", "clahe.bins"),
    (dict(options={"channels": ["DNA"] * 5000}), "bad_dataset", "channel 'DNA' is listed twice"),
    (dict(options={"channels": 123}), "bad_config", "channels must be a list of channel names"),
    (dict(options={"shape": {"size": [10**6, 10**6], "mode": "crop_or_pad"}}), "bad_config",
     "shape.size must be [height, width] in pixels (integers 1..16384)"),
    (dict(dataset="JUMPS3MultiView:bucket=x:prefix=p:max_samples=-5"), "bad_dataset", "max_samples must be a positive"),
]


def test_every_request_size_is_refused_in_one_line_naming_the_key_while_another_job_streams(daemon, synthetic):
    """Issue #16: every number an attach request sets, bounded before the daemon sizes anything from it, through
    the real socket: a one-line error with the key and the accepted range, a daemon log line, nothing allocated,
    and a job beside it that keeps receiving exact pixels."""
    d = daemon()
    other = Streaming(d, synthetic, f"beside-hostile-{PID}")
    try:
        other.wait_for_more(2, "the other job to stream")
        shm_before = request("status", d.socket)["shm_bytes"]
        for i, (fields, code, needle) in enumerate(HOSTILE_SIZES):
            message = {"dataset": synthetic.dataset, "batch_size": 4, "job": f"hostile{i}", **fields}
            with connect(d) as s:
                reply = ask(s, "attach", **message)
            assert reply["ok"] is False and reply["code"] == code, (fields, reply)
            assert needle in reply["error"] and "\n" not in reply["error"], (fields, reply)
            assert len(reply["error"]) < 600, (fields, reply)   # one readable line, not an echo of the request
        other.wait_for_more(2, "the other job to keep streaming after the hostile attaches")
        status = request("status", d.socket)
        assert [j["job"] for j in status["jobs"]] == [other.stream.job] and status["shm_bytes"] == shm_before
        for i, (_, code, needle) in enumerate(HOSTILE_SIZES):
            lines = [line for line in d.log.splitlines() if f"of job hostile{i} from pid" in line]
            assert len(lines) == 1 and f"attach refused ({code})" in lines[0] and needle in lines[0], (i, lines)
    finally:
        other.check()


def test_next_and_release_with_any_64_bit_numbers_answer_with_exact_pixels_or_the_epoch_end(daemon, synthetic):
    d = daemon()
    source = SourceFields(synthetic.manifest, DEFAULT_CHANNELS)
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=f"far-{PID}", cache_size=12, **RAW) as stream:
        for epoch in (MAX_EPOCH, MAX_EPOCH - 1, 1000, 5, 0):   # any epoch is a seeded permutation: a batch
            batch = stream.next(epoch, 1)
            assert [source.identify(f).field for f in batch.images] == batch.ids
        for epoch in (MAX_EPOCH + 1, 2**63 - 1):   # beyond any training run: one line, and the stream goes on
            with pytest.raises(PrefetchdError) as info:
                stream.next(epoch, 0)
            assert str(info.value) == f"epoch must be an integer >= 0 and <= {MAX_EPOCH}, got {epoch}"
        with pytest.raises(IndexError, match="asked for 9223372036854775807"):
            stream.next(0, 2**63 - 1)                       # past the epoch's last batch: its end
        assert stream._conn.request("release", slots=[2**63 - 1, -(2**63), 10**6])["ok"]   # not ours: ignored
        assert len(stream.next(0, 2).ids) == 4


def test_a_rank_naming_epochs_out_of_order_holds_a_bounded_number_of_schedules():
    """A rank's `next` names any epoch (a resumed checkpoint, or a hostile client walking backwards): the daemon
    keeps the schedules around the newest only, not one per epoch ever named (each is O(fields / world_size))."""
    timeline = Timeline(1000, 0, 1, 4, False, Quarantine(1000))
    for epoch in range(40, 0, -1):   # what `Job.orders_ready` puts for `next(epoch, ...)`
        for e in (epoch, epoch + 1):
            if not timeline.has(0, e):
                timeline.put(0, e, timeline.compute(0, e))
    held = [e for e in range(0, 42) if timeline.has(0, e)]
    assert held == list(range(1, 2 + ORDERS_AHEAD)), held   # the newest and the look-ahead the horizon reads
    timeline.put(0, 7, timeline.compute(0, 7))   # and forwards again
    assert [e for e in range(0, 42) if timeline.has(0, e)] == [7], "epochs far from the newest are dropped"


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
    taken = f"taken-{PID}"
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=taken, cache_size=12, **RAW):
        with pytest.raises(PrefetchdError, match="already attached"):
            attach(synthetic.dataset, batch_size=4, socket=d.socket, job=taken, cache_size=12, **RAW)
    for job in ("nobucket", "badprefetch", "badrank", taken):
        wait_until(lambda: f"of job {job} from pid" in d.log, 10, f"a log line for the failed attach of {job}")
    # Refused by the protocol's schema before the daemon reads the request as an attach: logged all the same.
    unreadable = [
        ("schema-type", json.dumps({"op": "attach", "dataset": synthetic.dataset, "batch_size": "four",
                                    "job": "schema-type"}), "field 'batch_size' of op 'attach' must be int"),
        ("schema-field", json.dumps({"op": "attach", "dataset": synthetic.dataset, "batch_size": 4, "gpus": 8,
                                     "job": "schema-field"}), "unknown field 'gpus' for op 'attach'"),
        ("schema-missing", json.dumps({"op": "attach", "batch_size": 4, "job": "schema-missing"}),
         "op 'attach' needs field(s): dataset"),
        ("(default id)", '{"op": "attach", "dataset": "x", "batch_size": 4, "world_size": ' + "9" * 5000 + "}",
         "request has a number too long to read: integers must fit in 64 bits"),
    ]
    for job, line, needle in unreadable:
        with connect(d) as s:
            s.sendall(line.encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        assert reply["code"] == "bad_request" and reply["error"].startswith(needle), reply
        wait_until(lambda: f"attach refused (bad_request) for rank 0 of job {job} from pid" in d.log, 10,
                   f"a log line for the unreadable attach {job}")
    with connect(d) as s:   # longer than a request may be: not read at all, but never silent
        s.sendall(json.dumps({"op": "attach", "dataset": "x" * 70000, "batch_size": 4}).encode() + b"\n")
        assert json.loads(s.makefile("rb").readline())["error"] == "request longer than 65536 bytes"
    wait_until(lambda: "refused a request from pid" in d.log, 10, "a log line for the oversized request")
    refused = [line for line in d.log.splitlines() if "attach refused" in line]
    assert len(refused) == 4 + len(unreadable), refused
    assert any(f"(rank_taken) for rank 0 of job {taken}" in line for line in refused), refused
    assert all(len(line) < 1500 for line in d.log.splitlines()), "a log line echoed a whole request"


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
        with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=f"patient-{PID}", cache_size=12,
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


def test_a_rank_that_leaves_while_waiting_in_next_frees_its_connection_rank_and_slots(daemon, synthetic, s3):
    """Issue #16: the daemon notices a client disconnect while that client waits in `next` for a slow fill (not
    when the fill ends): its connection is closed and uncounted, its rank is free, it holds no slot, and the
    rank can be attached again at once."""
    with FaultProxy(upstream=s3.endpoint_url, seed=3) as proxy:
        d = daemon("s3.read_timeout_s=60", endpoint_url=proxy.url)
        waiter = connect(d)
        try:
            assert ask(waiter, "attach", dataset=synthetic.dataset, batch_size=4, job=f"leaver-{PID}",
                       options={"cache_size": 12, "prefetch_factor": 0, **RAW})["ok"]
            assert ask(waiter, "next", epoch=0, batch=0)["ok"]   # batch 0's 4 slots leased to it
            proxy.add_rule("stall", stall_s=30)                  # every GET from now on hangs 30 s
            waiter.sendall(json.dumps({"op": "next", "epoch": 0, "batch": 5}).encode() + b"\n")
            wait_until(lambda: request("status", d.socket)["inflight_requests"] > 0, 30, "batch 5's GETs to stall")
            job = request("status", d.socket)["jobs"][0]
            assert job["ranks"]["0"]["connected"] and job["slots"]["LEASED"] == 0   # released when it asked again
        finally:
            waiter.close()
        # The stall holds for ~30 s more: only watching the socket tells the daemon the waiter left.
        wait_until(lambda: f"left while rank 0 of job leaver-{PID} waited for a batch" in d.log, 10, "the daemon to notice")
        status = request("status", d.socket)
        job = status["jobs"][0]
        assert status["connections"] == 1, status["connections"]   # the one asking: the waiter's is uncounted
        assert job["ranks"]["0"] == {**job["ranks"]["0"], "connected": False, "leased": 0}, job["ranks"]
        assert job["slots"]["LEASED"] == 0 and status["inflight_requests"] > 0   # freed before the fill ended
        with attach(synthetic.dataset, batch_size=4, socket=d.socket, job=f"leaver-{PID}", cache_size=12,
                    prefetch_factor=0, **RAW) as stream:        # the rank is free at once: no rank_taken
            assert stream.status()["jobs"][0]["ranks"]["0"]["connected"]


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
