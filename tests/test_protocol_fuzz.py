"""Property-based fuzzing of the control protocol against a live daemon (hypothesis).

Garbage bytes, wrong types, unknown ops and fields, oversized lines and valid-looking attaches with
garbage options: every request gets exactly one JSON reply (`ok: false` with a `code` and an `error`
for bad ones), the daemon stays up, and a client attached all along keeps receiving correct batches.
"""

from __future__ import annotations

import json
import socket

from hypothesis import HealthCheck, given, settings, strategies as st

from prefetchd.dev import synth
from prefetchd.channels import PHENIX_CHANNELS
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.options import ACCEPTED
from prefetchd.protocol import MAX_LINE, SCHEMA

import numpy as np

OPS = [op for op in SCHEMA if op != "stop"] + ["", "STATUS", "op_status", "__init__", "_close_job", "stop "]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | \
    st.integers(min_value=2**63 - 2, max_value=2**70)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) |
                           st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
field_names = st.sampled_from(sorted({f for fields in SCHEMA.values() for f in fields} | {"x", "op2"}))


def requests(dataset: str):
    garbage_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b""))
    random_object = st.builds(lambda op, extra: {"op": op, **extra}, st.sampled_from(OPS),
                              st.dictionaries(field_names, json_values, max_size=4))
    attach_garbage = st.builds(
        lambda bs, opts, extra: {"op": "attach", "dataset": dataset, "batch_size": bs, "options": opts, **extra},
        st.integers(min_value=-3, max_value=40) | json_scalars,
        st.dictionaries(st.sampled_from(list(ACCEPTED) + ["junk"]), json_values | st.integers(-2, 10**7), max_size=4),
        st.dictionaries(st.sampled_from(["seed", "rank", "world_size", "local_world_size", "job"]), json_scalars, max_size=3),
    )
    as_json = (random_object | attach_garbage | json_values).map(lambda m: json.dumps(m).encode())
    return garbage_bytes | as_json | st.just(b"[" * 5000) | st.just(b'{"op": "status"' + b" " * 70000 + b"}")


def assert_good_batch(stream, epoch: int, index: int) -> None:
    batch = stream.next(epoch, index)
    for i, field_id in enumerate(batch.ids):
        plate, well, site = field_id.split("/")
        expected = synth.expected_signature(plate, well, int(site), PHENIX_CHANNELS["DNA"])
        np.testing.assert_array_equal(batch.images[i, 0, 0, : len(expected)], expected)


def test_fuzzed_requests_never_hurt_the_daemon_or_other_clients(daemon, synthetic):
    # A small shm budget and fast reaping: attaches the fuzzer gets right are bounded and cleaned up.
    d = daemon("shm.budget_bytes=67108864", "job.idle_timeout_s=0.5", "s3.retries=1")
    steady = attach(synthetic.dataset, batch_size=2, socket=d.socket, job="steady", cache_size=24,
                    illum=False, clahe=False, rescale=False)
    position = {"epoch": 0, "batch": 0}

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.lists(requests(synthetic.dataset), min_size=1, max_size=4))
    def check(lines):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(d.socket))
            reader = sock.makefile("rb")
            for line in lines:
                try:
                    sock.sendall(line + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    break  # closed after an oversized line: allowed
                raw = reader.readline(MAX_LINE * 16)
                assert raw.endswith(b"\n"), f"no reply to {line[:100]!r}"
                reply = json.loads(raw)
                assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
                if not reply["ok"]:
                    assert reply["code"] != "internal", reply  # validated, not crashed into
                    assert isinstance(reply["error"], str) and reply["error"]
                if len(line) > MAX_LINE:
                    assert reply["code"] == "bad_request" and reader.readline() == b""
                    break
        # the steady client is unaffected
        if position["batch"] == stream_batches:
            position["epoch"] += 1
            position["batch"] = 0
        assert_good_batch(steady, position["epoch"], position["batch"])
        position["batch"] += 1

    stream_batches = steady.batches_per_epoch
    try:
        check()
        status = request("status", d.socket)
        assert status["pid"] == d.proc.pid and d.proc.poll() is None
        assert "Traceback" not in d.log, d.log[-3000:]
    finally:
        steady.close()
