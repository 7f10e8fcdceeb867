"""Cumulative counters shared by the daemon's parts, and a sliding-window throughput meter."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Iterator

# What the GETs of the running task are for: illumination files are counted apart from images. A context
# variable, so the stores (and the disk tier between) need no extra argument; asyncio tasks inherit it.
_ILLUM = contextvars.ContextVar("prefetchd_fetching_illum", default=False)


@contextlib.contextmanager
def fetching_illum() -> Iterator[None]:
    """GETs made inside count as illumination GETs (`FetchCounters.illum_gets`, `illum_bytes`)."""
    token = _ILLUM.set(True)
    try:
        yield
    finally:
        _ILLUM.reset(token)


class RateMeter:
    """Bytes per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._sum = 0

    def add(self, amount: int) -> None:
        now = time.monotonic()
        self._events.append((now, amount))
        self._sum += amount
        self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        self._trim(now)
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)
        return self._sum / span

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self.window_s:
            self._sum -= self._events.popleft()[1]


@dataclass
class FetchCounters:
    gets: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    inflight: int = 0
    errors: int = 0
    illum_gets: int = 0           # of `gets`, those for illumination files
    illum_bytes: int = 0          # of `bytes_fetched`, those of illumination files
    meter: RateMeter = field(default_factory=RateMeter)

    def count_get(self) -> None:
        self.gets += 1
        if _ILLUM.get():
            self.illum_gets += 1

    def add_bytes(self, n: int) -> None:
        self.bytes_fetched += n
        self.meter.add(n)
        if _ILLUM.get():
            self.illum_bytes += n
