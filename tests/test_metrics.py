"""Prometheus metrics: scrape the daemon's /metrics over HTTP and compare with `status`."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefetchd.client import attach
from prefetchd.control import request

from conftest import free_port, wait_until
from faultproxy import FaultProxy

RAW = {"illum": False, "clahe": False, "rescale": False}


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
        assert m[("prefetchd_retries_total", ())] == 0 and m[("prefetchd_quarantined_fields_total", ())] == 0
        assert m[("prefetchd_shm_bytes", ())] == status["shm_bytes"] > 0
        assert m[("prefetchd_jobs", ())] == 1
        assert ("prefetchd_stall_seconds_total", ()) in m and ("prefetchd_inflight_requests", ()) in m
        # rates in bytes per second (Prometheus base units), not MB/s
        assert ("prefetchd_fetch_bytes_per_second", ()) in m and ("prefetchd_get_window_bytes_per_second", ()) in m
        assert not [name for name, _ in m if "_mb_" in name]
        # the standard process metrics are the daemon's own
        rss = int(next(l for l in open(f"/proc/{d.proc.pid}/status") if l.startswith("VmRSS:")).split()[1]) * 1024
        assert 0.5 * rss < m[("process_resident_memory_bytes", ())] < 2 * rss
        assert abs(m[("process_open_fds", ())] - len(os.listdir(f"/proc/{d.proc.pid}/fd"))) <= 2
        assert m[("process_cpu_seconds_total", ())] > 0
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


def test_quarantine_is_a_counter_and_a_gauge_that_drops_when_the_job_closes(daemon, synthetic, s3):
    """Alert on `increase(prefetchd_quarantined_fields_total[1h]) > 0`; the gauge shows what is quarantined now."""
    port = free_port()
    with FaultProxy(upstream=s3.endpoint_url, seed=3) as proxy:
        d = daemon(f"metrics.port={port}", "job.idle_timeout_s=0.5", "s3.retries=1", endpoint_url=proxy.url)
        bad = synthetic.manifest.fields[4]
        proxy.add_rule("404", match=next(iter(bad.keys.values())))
        with attach(synthetic.dataset, batch_size=4, socket=d.socket, cache_size=24, job="quarantine", **RAW) as stream:
            ids = [i for b in stream.epoch(0) for i in b.ids]
            m = scrape(port)
            assert bad.id not in ids and len(ids) == synthetic.spec.field_count
            assert m[("prefetchd_quarantined_fields_total", ())] == 1
            assert m[("prefetchd_fields_in_quarantine", ())] == 1
        wait_until(lambda: request("status", d.socket)["jobs"] == [], 30, "the detached job to be reaped")
        m = scrape(port)
        assert m[("prefetchd_fields_in_quarantine", ())] == 0          # the alert clears ...
        assert m[("prefetchd_quarantined_fields_total", ())] == 1      # ... the history stays
