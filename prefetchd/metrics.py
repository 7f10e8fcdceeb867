"""Prometheus metrics: the status counters on an optional HTTP port (`metrics.port`, 0 = off).

Served from the daemon's own event loop (a tiny asyncio HTTP/1.0 responder), so a scrape reads the
counters on the loop thread and never races the code that updates them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# status key -> (metric name, help, counter?)
COUNTERS = {
    "fields_served": ("prefetchd_fields_served", "Fields handed to trainers", True),
    "cache_hits": ("prefetchd_cache_hits", "Fields served from a READY slot", True),
    "cache_misses": ("prefetchd_cache_misses", "Fields that had to be fetched when asked for", True),
    "bytes_fetched": ("prefetchd_fetched_bytes", "Bytes read from the object store", True),
    "gets": ("prefetchd_gets", "GET requests issued", True),
    "retries": ("prefetchd_retries", "GET attempts retried", True),
    "fetch_errors": ("prefetchd_fetch_errors", "GETs that failed after all retries", True),
    "stall_s": ("prefetchd_stall_seconds", "Seconds trainers waited in next()", True),
    "quarantined": ("prefetchd_quarantined_fields", "Fields quarantined (stayed bad after retries), closed jobs included", True),
    "image_gets": ("prefetchd_image_gets", "GET requests for images (of prefetchd_gets)", True),
    "image_bytes_fetched": ("prefetchd_image_fetched_bytes", "Image bytes read from the object store", True),
    "illum_gets": ("prefetchd_illum_gets", "GET requests for illumination files (of prefetchd_gets)", True),
    "illum_bytes_fetched": ("prefetchd_illum_fetched_bytes", "Illumination bytes read from the object store", True),
    "fields_shared": ("prefetchd_fields_shared", "Fields a job copied from another job's arena instead of GETs", True),
    "connections_refused": ("prefetchd_connections_refused", "Control connections refused by the connection caps", True),
}
# status["illum"] key -> (metric name, help, counter?): the daemon-wide illumination store (prefetchd/illum.py)
ILLUM = {
    "plates": ("prefetchd_illum_plates", "Plates whose illumination files are held", False),
    "bytes": ("prefetchd_illum_bytes", "Bytes of illumination arrays held", False),
    "budget_bytes": ("prefetchd_illum_budget_bytes", "illum.budget_bytes", False),
    "evictions": ("prefetchd_illum_evictions", "Plates dropped to stay within illum.budget_bytes", True),
}
GAUGES = {
    "uptime_s": ("prefetchd_uptime_seconds", "Seconds since the daemon started"),
    "hit_rate": ("prefetchd_hit_rate", "Cache hits / fields served"),
    "inflight_requests": ("prefetchd_inflight_requests", "GETs in flight"),
    "shm_bytes": ("prefetchd_shm_bytes", "Shared memory held by arenas"),
    "connections": ("prefetchd_connections", "Control connections open (attached ranks and others)"),
}
# status key in MB/s (10^6 bytes) -> metric in bytes per second, Prometheus' base unit
RATES = {
    "fetch_mb_per_s": ("prefetchd_fetch_bytes_per_second", "Fetch throughput over the last 10 s"),
}

# status["concurrency"] key -> (metric name, help): the adaptive GET limiter (prefetchd/concurrency.py)
CONCURRENCY_GAUGES = {
    "limit": ("prefetchd_get_concurrency_limit", "GETs allowed in flight now (adaptive limit)"),
    "maximum": ("prefetchd_get_concurrency_maximum", "Upper bound of the GET limit (s3.max_concurrency)"),
    "minimum": ("prefetchd_get_concurrency_minimum", "Lower bound of the GET limit"),
}
CONCURRENCY_RATES = {
    "throughput_mb_s": ("prefetchd_get_window_bytes_per_second", "GET throughput in the limiter's last window"),
}
MB = 1e6
CONCURRENCY_COUNTERS = {
    "throttles": ("prefetchd_throttles", "GETs S3 answered with 503 SlowDown / 429 / throttling"),
    "decreases": ("prefetchd_concurrency_decreases", "Multiplicative decreases of the GET limit on throttling"),
    "increases": ("prefetchd_concurrency_increases", "Step-ups of the GET limit while throughput grew"),
}


class StatusCollector:
    def __init__(self, status: Callable[[], dict[str, Any]]):
        self._status = status

    def collect(self):
        s = self._status()
        for key, (name, doc, _) in COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0)))
            yield c
        yield from _gauges(GAUGES, s)
        yield from _gauges(RATES, s, scale=MB)
        jobs = s.get("jobs", [])
        yield _gauge("prefetchd_jobs", "Attached jobs", len(jobs))
        yield _gauge("prefetchd_fields_in_quarantine", "Fields quarantined in the jobs attached now (drops when a "
                     "job closes)", sum(len(j.get("quarantined", [])) for j in jobs))
        c = s.get("concurrency") or {}
        yield from _gauges(CONCURRENCY_GAUGES, c)
        yield from _gauges(CONCURRENCY_RATES, c, scale=MB)
        for key, (name, doc) in CONCURRENCY_COUNTERS.items():
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(c.get(key, 0)))
            yield counter
        illum = s.get("illum") or {}
        for key, (name, doc, counter) in ILLUM.items():
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc)
            family.add_metric([], float(illum.get(key, 0)))
            yield family
        slots = GaugeMetricFamily("prefetchd_slots", "Arena slots per state, all jobs", labels=["state"])
        counts = {k.lower(): v for k, v in (s.get("slots") or {}).items()}
        for state in sorted({"free", "filling", "ready", "leased"} | set(counts)):
            slots.add_metric([state], float(counts.get(state, 0)))
        yield slots


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _gauges(table: dict[str, tuple[str, str]], values: dict[str, Any], scale: float = 1.0):
    for key, (name, doc) in table.items():
        yield _gauge(name, doc, float(values.get(key, 0)) * scale)


def make_registry(status: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """The status counters, plus the standard process_* (CPU, RSS, open fds), python_gc_* and python_info."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def start_metrics_server(status: Callable[[], dict[str, Any]], host: str, port: int) -> asyncio.AbstractServer:
    registry = make_registry(status)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] in (b"/metrics", b"/"):
                body, status_line, ctype = generate_latest(registry), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status_line, ctype = b"see /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.0 " + status_line + b"\r\nContent-Type: " + ctype +
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host=host, port=port, limit=16 * 1024)
    return server
