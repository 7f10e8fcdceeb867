"""How many GETs may be in flight: a limit that follows throughput and backs off when S3 throttles.

`AdaptiveConcurrency` replaces a plain `asyncio.Semaphore(s3.max_concurrency)`: the stores still do
`async with limiter:` around each GET, and report what happened with `on_success(nbytes)` or
`on_throttle()` (503 SlowDown, 429, RequestLimitExceeded, ThrottlingException).

Control law (AIMD with hill climbing), evaluated on windows of `window_s` seconds of the injected clock.
A window closes at the first event (acquire, release, success, throttle) at least `window_s` after it
opened, so the law is deterministic given the clock and the sequence of calls:

- **Throttle → multiplicative decrease**: `limit = max(minimum, floor(limit * 0.7))`, at most once per
  window, so a burst of 503s is one decrease. A window with a throttle is not used for hill climbing,
  and the limiter then holds for `HOLD_WINDOWS` windows before it probes upward again.
- **Hill climbing** on throughput (bytes completed in the window / window length), only for windows
  in which the limit was *saturated* (in-flight GETs reached the limit, or someone waited): below the
  limit, the limit is not what bounds throughput and says nothing.
  - no step pending and no hold: probe one step up (`+max(1, limit // 10)`), remembering the window's
    throughput as the reference;
  - a probe pending: if the window's throughput beat the reference by more than 5 %, keep the step and
    climb again (new reference); otherwise step back and hold for `HOLD_WINDOWS` windows.
- Never above `maximum` (`s3.max_concurrency`) nor below `minimum`.

The limit starts at `initial`, by default `maximum`: without throttling nothing ever lowers it (a probe
needs room above), so an unthrottled daemon behaves exactly like the fixed semaphore it replaces, and
the limiter costs nothing where S3 is not pushing back. After a throttle it climbs back as long as that
pays. `minimum == maximum` pins the limit (the `s3.get_concurrency: fixed` setting).

Waiting is FIFO (a slot freed or added goes to the longest waiter; newcomers never barge past waiters)
and cancellation-safe (a waiter cancelled before or just after being granted a slot gives it back).
When the limit shrinks below the GETs in flight, nothing is interrupted: new acquisitions wait until
`inflight < limit`. Not thread-safe: use it from one event loop, like everything in the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Callable

DECREASE_FACTOR = 0.7   # limit *= 0.7 on throttling
IMPROVEMENT = 0.05      # a step up must raise throughput by more than 5 % to be kept
DEFAULT_MINIMUM = 2     # never fewer GETs in flight than this while adapting
HOLD_WINDOWS = 3        # windows to wait after a throttle or an unprofitable probe before probing again


class AdaptiveConcurrency:
    def __init__(self, maximum: int, *, minimum: int = DEFAULT_MINIMUM, initial: int | None = None, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._maximum = max(1, int(maximum))
        self._minimum = max(1, min(int(minimum), self._maximum))
        start = self._maximum if initial is None else int(initial)
        self._limit = min(self._maximum, max(self._minimum, start))
        self._window_s = float(window_s)
        self._clock = clock
        self._inflight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        # cumulative counters
        self.throttles = 0
        self.decreases = 0
        self.increases = 0
        # the current window
        self._window_start = clock()
        self._window_bytes = 0
        self._saturated = False
        self._throttled = False
        # hill climbing
        self._rate = 0.0                 # bytes/s of the last closed window
        self._reference: float | None = None  # throughput before the pending probe
        self._probe = 0                  # size of the pending step up (0 = none)
        self._hold = 0                   # windows left before the next probe

    # ---- the semaphore side -------------------------------------------------------------------

    async def __aenter__(self) -> None:
        self._roll()
        if not self._waiters and self._inflight < self._limit:
            self._take()
            return
        self._saturated = True
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # _wake() counts the slot as ours before it resolves the future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted, then cancelled before we could run: give the slot back
            else:
                try:
                    self._waiters.remove(future)
                except ValueError:
                    pass
                self._wake()
            raise

    async def __aexit__(self, *exc) -> None:
        self._release()
        self._roll()

    def try_acquire(self) -> bool:
        """A slot at once when one is free and nobody waits (give it back with `__aexit__`), else False. For a
        caller that already holds a slot and would take more: waiting while holding could deadlock."""
        self._roll()
        if self._waiters or self._inflight >= self._limit:
            return False
        self._take()
        return True

    def _take(self) -> None:
        self._inflight += 1
        if self._inflight >= self._limit:
            self._saturated = True

    def _release(self) -> None:
        self._inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._inflight < self._limit:
            future = self._waiters.popleft()
            if future.done():  # cancelled while queued
                continue
            self._take()
            future.set_result(None)

    # ---- feedback -----------------------------------------------------------------------------

    def on_success(self, nbytes: int) -> None:
        """A GET completed with `nbytes`; throughput is measured on the aggregate (bytes per window)."""
        self._roll()
        self._window_bytes += max(0, int(nbytes))

    def on_throttle(self) -> None:
        """S3 asked us to slow down: at most one multiplicative decrease per window."""
        self._roll()
        self.throttles += 1
        if self._throttled:
            return
        self._throttled = True
        self._probe = 0
        self._reference = None
        self._hold = HOLD_WINDOWS
        lower = max(self._minimum, math.floor(self._limit * DECREASE_FACTOR))
        if lower < self._limit:
            self._limit = lower
            self.decreases += 1

    # ---- windows ------------------------------------------------------------------------------

    def _roll(self) -> None:
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self._window_s:
            return
        rate = self._window_bytes / elapsed if elapsed > 0 else 0.0
        self._rate = rate
        if not self._throttled:
            self._climb(rate)
        self._window_start = now
        self._window_bytes = 0
        self._throttled = False
        self._saturated = self._inflight >= self._limit or bool(self._waiters)

    def _climb(self, rate: float) -> None:
        if not self._saturated:
            # the limit did not bind: a pending probe cannot be judged, so it is taken back (no ratchet)
            self._limit = max(self._minimum, self._limit - self._probe)
            self._probe = 0
            self._reference = None
            self._hold = max(0, self._hold - 1)
            return
        if self._probe:
            if rate > self._reference * (1 + IMPROVEMENT):
                self._step_up(rate)
            else:
                self._limit = max(self._minimum, self._limit - self._probe)
                self._probe = 0
                self._reference = None
                self._hold = HOLD_WINDOWS
            return
        if self._hold:
            self._hold -= 1
            return
        self._step_up(rate)

    def _step_up(self, rate: float) -> None:
        step = min(max(1, self._limit // 10), self._maximum - self._limit)
        if step <= 0:
            self._probe = 0
            self._reference = None
            return
        self._limit += step
        self._probe = step
        self._reference = rate
        self.increases += 1
        self._wake()

    def set_bounds(self, maximum: int, minimum: int) -> None:
        """A reloaded `s3.max_concurrency` / `s3.get_concurrency`: a limit that sat at the old maximum (never
        throttled) moves to the new one; a lowered one stays where throttling put it, within the bounds."""
        at_max = self._limit >= self._maximum
        self._maximum = max(1, int(maximum))
        self._minimum = max(1, min(int(minimum), self._maximum))
        self._limit = min(self._maximum, max(self._minimum, self._maximum if at_max else self._limit))
        self._probe = 0
        self._reference = None
        self._wake()

    # ---- introspection ------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def maximum(self) -> int:
        return self._maximum

    @property
    def minimum(self) -> int:
        return self._minimum

    @property
    def adaptive(self) -> bool:
        return self._minimum < self._maximum

    def snapshot(self) -> dict:
        elapsed = self._clock() - self._window_start
        # A window nobody has closed for a while (no GETs) reports what it holds, not a stale rate.
        rate = self._window_bytes / elapsed if elapsed >= self._window_s else self._rate
        return {
            "limit": self._limit,
            "maximum": self._maximum,
            "minimum": self._minimum,
            "inflight": self._inflight,
            "throttles": self.throttles,
            "decreases": self.decreases,
            "increases": self.increases,
            "throughput_mb_s": rate / 1e6,
        }
