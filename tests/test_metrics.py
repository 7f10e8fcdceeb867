"""Prometheus metrics: scrape the daemon's /metrics over HTTP and compare with `status`."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefetchd.client import attach
from prefetchd.control import request

RAW = {"illum": False, "clahe": False, "rescale": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_port_exports_the_status_counters(daemon, synthetic):
    port = free_port()
    d = daemon(f"metrics.port={port}")
    n = synthetic.spec.field_count
    with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=n, job="metrics", **RAW) as stream:
        for _ in stream.epoch(0):
            pass
        status = request("status", d.socket)
        m = scrape(port)
        assert status["metrics_port"] == port
        assert m[("prefetchd_fields_served_total", ())] == status["fields_served"] == n
        assert m[("prefetchd_cache_hits_total", ())] + m[("prefetchd_cache_misses_total", ())] == n
        assert m[("prefetchd_fetched_bytes_total", ())] == status["bytes_fetched"] > 0
        assert m[("prefetchd_gets_total", ())] == status["gets"] == 5 * n
        assert m[("prefetchd_retries_total", ())] == 0 and m[("prefetchd_quarantined_fields", ())] == 0
        assert m[("prefetchd_shm_bytes", ())] == status["shm_bytes"] > 0
        assert m[("prefetchd_jobs", ())] == 1
        assert ("prefetchd_stall_seconds_total", ()) in m and ("prefetchd_inflight_requests", ()) in m
        slots = {dict(labels)["state"]: v for (name, labels), v in m.items() if name == "prefetchd_slots"}
        assert sum(slots.values()) == n and slots["leased"] == 4  # the last batch is still leased
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
    # a client that sends garbage to the metrics port does not hurt the daemon
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x00" * 20000)
    assert request("ping", d.socket)["ok"]


def test_metrics_are_off_by_default(daemon):
    d = daemon()
    assert request("status", d.socket)["metrics_port"] is None
