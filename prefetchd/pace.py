"""How long a fill takes and how fast ranks consume: the measurements prefetch depth is sized from."""

from __future__ import annotations

import collections
import time

from prefetchd.counters import RateMeter


class Pace:
    """Moving averages of how long a fill takes and how fast each rank consumes (for Little's law)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.rate_per_rank = 0.0
        self._last_next: dict[int, float] = {}
        self._completions = RateMeter(window_s=5.0)
        self._fills: collections.deque[float] = collections.deque(maxlen=64)
        self._fill_s: float | None = 0.0   # None: recompute on the next read (once per plan, not per fill)

    def fill_took(self, seconds: float) -> None:
        self._fills.append(seconds)
        self._fill_s = None
        self._completions.add(1)

    @property
    def fill_s(self) -> float:
        """Seconds a fill takes: a low quantile (10 %) of the last 64, not the mean: a fill's duration includes
        waiting for a CPU or a connection, which grows with the very depth it would set (a feedback loop); the
        fastest fills show the latency to hide."""
        if self._fill_s is None:
            ordered = sorted(self._fills)
            position = 0.1 * (len(ordered) - 1)      # numpy's default (linear) quantile
            low = int(position)
            high = min(low + 1, len(ordered) - 1)
            self._fill_s = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
        return self._fill_s

    @fill_s.setter
    def fill_s(self, seconds: float) -> None:   # tests pin it
        self._fill_s = seconds

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
