"""How long a fill takes and how fast ranks consume: the measurements prefetch depth is sized from."""

from __future__ import annotations

import collections
import time

import numpy as np

from prefetchd.counters import RateMeter


class Pace:
    """Moving averages of how long a fill takes and how fast each rank consumes (for Little's law)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.fill_s = 0.0
        self.rate_per_rank = 0.0
        self._last_next: dict[int, float] = {}
        self._completions = RateMeter(window_s=5.0)
        self._fills: collections.deque[float] = collections.deque(maxlen=64)

    def fill_took(self, seconds: float) -> None:
        # A low quantile, not the mean: a fill's duration includes waiting for a CPU or a connection, which
        # grows with the very depth it would set (a feedback loop); the fastest fills show the latency to hide.
        self._fills.append(seconds)
        self.fill_s = float(np.quantile(self._fills, 0.1))
        self._completions.add(1)

    @property
    def fill_rate(self) -> float:
        """Fills completed per second over the last few seconds."""
        return self._completions.rate()

    def consumed(self, rank: int, fields: int) -> None:
        now = time.monotonic()
        last = self._last_next.get(rank)
        self._last_next[rank] = now
        if last is None or now <= last:
            return
        rate = fields / (now - last)
        self.rate_per_rank = rate if self.rate_per_rank == 0 else self.rate_per_rank + self.alpha * (rate - self.rate_per_rank)
