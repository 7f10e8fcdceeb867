"""The adaptive GET limiter (prefetchd/concurrency.py): real asyncio, a fake clock drives the windows.

Nothing here sleeps for time: `settle()` only yields to the event loop so that runnable tasks run, and
windows end when the test moves the clock.
"""

from __future__ import annotations

import asyncio

import pytest

from prefetchd.concurrency import HOLD_WINDOWS, AdaptiveConcurrency


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float = 1.0) -> None:
        self.t += seconds


async def settle(rounds: int = 20) -> None:
    """Let every runnable task run until it blocks (yields only; no timers)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def fill(lim: AdaptiveConcurrency) -> None:
    """Take every free slot, so the window counts as saturated."""
    while lim.inflight < lim.limit:
        await lim.__aenter__()


def run(coro):
    return asyncio.run(coro)


# ---- the semaphore side --------------------------------------------------------------------------


def test_concurrent_acquirers_never_exceed_the_limit_even_when_it_shrinks():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(10, minimum=2, clock=clock)
        gate = asyncio.Event()
        peak = 0
        done = 0

        async def worker():
            nonlocal peak, done
            async with lim:
                peak = max(peak, lim.inflight)
                assert lim.inflight <= lim.limit
                await gate.wait()
            done += 1

        tasks = [asyncio.create_task(worker()) for _ in range(50)]
        await settle()
        assert lim.inflight == 10 and peak == 10
        lim.on_throttle()  # 10 -> 7 while 10 are in flight: nobody is interrupted, nobody new gets in
        assert lim.limit == 7 and lim.inflight == 10
        gate.set()
        await asyncio.gather(*tasks)
        assert done == 50 and lim.inflight == 0
        assert peak == 10  # the 40 that waited ran under the shrunken limit
    run(main())


def test_after_a_decrease_new_acquisitions_wait_until_inflight_is_below_the_limit():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(10, clock=clock)
        await fill(lim)
        lim.on_throttle()
        assert lim.limit == 7
        waiter = asyncio.create_task(lim.__aenter__())
        for inflight in (9, 8, 7):  # releasing down to the limit is not enough
            await lim.__aexit__(None, None, None)
            await settle()
            assert not waiter.done() and lim.inflight == inflight
        await lim.__aexit__(None, None, None)  # 6 < 7: the waiter gets the slot
        await settle()
        assert waiter.done() and lim.inflight == 7
    run(main())


def test_waiting_is_fifo_and_newcomers_do_not_barge():
    async def main():
        lim = AdaptiveConcurrency(1, minimum=1, clock=Clock())
        order = []

        async def worker(i):
            async with lim:
                order.append(i)

        await lim.__aenter__()
        tasks = [asyncio.create_task(worker(i)) for i in range(6)]
        await settle()
        assert order == []
        await lim.__aexit__(None, None, None)   # hands the slot to worker 0 ...
        late = asyncio.create_task(worker("late"))  # ... so this newcomer must queue behind 1..5
        await asyncio.gather(*tasks, late)
        assert order == [0, 1, 2, 3, 4, 5, "late"]
        assert lim.inflight == 0
    run(main())


def test_a_cancelled_waiter_does_not_leak_a_slot():
    async def main():
        lim = AdaptiveConcurrency(2, minimum=1, clock=Clock())
        await fill(lim)
        queued = asyncio.create_task(lim.__aenter__())
        await settle()
        queued.cancel()  # cancelled while queued
        await settle()
        assert queued.cancelled() and lim.inflight == 2
        await lim.__aexit__(None, None, None)
        await lim.__aexit__(None, None, None)
        assert lim.inflight == 0
        await fill(lim)  # both slots are still there
        assert lim.inflight == 2
    run(main())


def test_a_waiter_cancelled_right_after_being_granted_passes_the_slot_on():
    async def main():
        lim = AdaptiveConcurrency(2, minimum=1, clock=Clock())
        await fill(lim)
        first = asyncio.create_task(lim.__aenter__())
        second = asyncio.create_task(lim.__aenter__())
        await settle()
        await lim.__aexit__(None, None, None)  # grants `first` its slot ...
        first.cancel()                         # ... which is cancelled before it could run
        await settle()
        assert first.cancelled()
        assert second.done() and not second.cancelled()  # the slot went to the next in line
        assert lim.inflight == 2
        await lim.__aexit__(None, None, None)
        await lim.__aexit__(None, None, None)
        assert lim.inflight == 0
    run(main())


def test_an_exception_inside_the_block_releases_the_slot():
    async def main():
        lim = AdaptiveConcurrency(3, minimum=1, clock=Clock())
        with pytest.raises(RuntimeError):
            async with lim:
                raise RuntimeError("GET failed")
        assert lim.inflight == 0
    run(main())


# ---- the control law ---------------------------------------------------------------------------


def test_throttles_decrease_multiplicatively_once_per_window_down_to_the_minimum():
    clock = Clock()
    lim = AdaptiveConcurrency(32, minimum=2, clock=clock)
    assert lim.limit == 32  # starts at the maximum: unthrottled, it is today's fixed semaphore
    for _ in range(10):      # a burst of 503s in one window is one decrease
        lim.on_throttle()
    assert lim.limit == 22
    seen = [lim.limit]
    for _ in range(8):
        clock.advance(1.0)
        lim.on_throttle()
        lim.on_throttle()
        seen.append(lim.limit)
    assert seen == [22, 15, 10, 7, 4, 2, 2, 2, 2]  # floor(x * 0.7), never below the minimum
    snap = lim.snapshot()
    assert snap["throttles"] == 26 and snap["decreases"] == 6 and snap["increases"] == 0


def test_half_a_window_later_is_still_the_same_window():
    clock = Clock()
    lim = AdaptiveConcurrency(20, clock=clock, window_s=1.0)
    lim.on_throttle()
    clock.advance(0.5)
    lim.on_throttle()
    assert lim.limit == 14
    clock.advance(0.5)
    lim.on_throttle()
    assert lim.limit == 9


def test_limit_climbs_while_saturated_throughput_grows_and_stops_at_the_maximum():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(8, minimum=2, initial=4, clock=clock)
        limits = []
        nbytes = 10_000_000
        for _ in range(8):
            await fill(lim)
            lim.on_success(nbytes)
            nbytes = int(nbytes * 1.2)  # each step up pays: +20 % throughput
            clock.advance(1.0)
            lim.on_success(0)  # the next event closes the window
            limits.append(lim.limit)
        assert limits == [5, 6, 7, 8, 8, 8, 8, 8]
        assert lim.snapshot()["increases"] == 4
    run(main())


def test_a_step_up_that_does_not_pay_is_undone_then_probed_again_later():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(16, minimum=2, initial=6, clock=clock)
        limits = []
        for _ in range(7):
            await fill(lim)
            lim.on_success(50_000_000)  # flat: the link is the bottleneck, not the limit
            clock.advance(1.0)
            lim.on_success(0)
            limits.append(lim.limit)
            while lim.inflight > lim.limit:  # a step back: in-flight GETs finish
                await lim.__aexit__(None, None, None)
        # probe, undo, hold HOLD_WINDOWS windows, probe again, undo
        assert HOLD_WINDOWS == 3
        assert limits == [7, 6, 6, 6, 6, 7, 6]
    run(main())


def test_no_increase_when_the_limit_is_not_what_bounds_throughput():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(16, initial=4, clock=clock)
        await lim.__aenter__()  # 1 of 4 slots used: demand, not the limit, sets the pace
        nbytes = 1_000_000
        for _ in range(6):
            lim.on_success(nbytes)
            nbytes *= 2
            clock.advance(1.0)
        lim.on_success(0)
        assert lim.limit == 4 and lim.snapshot()["increases"] == 0
    run(main())


def test_after_a_throttle_it_holds_then_climbs_back_while_that_pays():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(10, clock=clock)
        await fill(lim)
        lim.on_throttle()
        assert lim.limit == 7
        while lim.inflight > lim.limit:
            await lim.__aexit__(None, None, None)
        limits = []
        nbytes = 10_000_000
        for _ in range(8):
            await fill(lim)
            lim.on_success(nbytes)
            nbytes = int(nbytes * 1.1)
            clock.advance(1.0)
            lim.on_success(0)
            limits.append(lim.limit)
        # the throttled window closes, HOLD_WINDOWS windows hold, then one step per window up to the maximum
        assert limits == [7, 7, 7, 7, 8, 9, 10, 10]
    run(main())


def test_an_increase_wakes_waiters():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(4, minimum=1, initial=2, clock=clock)
        await fill(lim)
        waiter = asyncio.create_task(lim.__aenter__())
        await settle()
        lim.on_success(1_000_000)
        clock.advance(1.0)
        lim.on_success(0)  # saturated window closes: probe one step up
        assert lim.limit == 3
        await settle()
        assert waiter.done() and lim.inflight == 3
    run(main())


def test_fixed_when_minimum_equals_maximum():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(8, minimum=8, initial=3, clock=clock)
        assert lim.limit == 8 and not lim.adaptive
        for _ in range(5):
            await fill(lim)
            lim.on_throttle()
            lim.on_success(10_000_000)
            clock.advance(1.0)
        assert lim.limit == 8
        snap = lim.snapshot()
        assert (snap["throttles"], snap["decreases"], snap["increases"]) == (5, 0, 0)
    run(main())


def test_bounds_are_sane_for_tiny_maxima():
    assert AdaptiveConcurrency(1).limit == 1 and AdaptiveConcurrency(1).minimum == 1
    assert AdaptiveConcurrency(0).limit == 1
    assert AdaptiveConcurrency(16, initial=100).limit == 16
    assert AdaptiveConcurrency(16, initial=0).limit == 2


def test_snapshot_reports_every_field():
    clock = Clock()
    lim = AdaptiveConcurrency(12, minimum=3, clock=clock)
    lim.on_success(4_000_000)
    clock.advance(2.0)
    snap = lim.snapshot()
    assert set(snap) == {"limit", "maximum", "minimum", "inflight", "throttles", "decreases", "increases",
                         "throughput_mb_s"}
    assert (snap["limit"], snap["maximum"], snap["minimum"], snap["inflight"]) == (12, 12, 3, 0)
    assert snap["throughput_mb_s"] == pytest.approx(2.0)  # 4 MB over the 2 s since the window opened
    lim.on_success(0)  # closes that window
    assert lim.snapshot()["throughput_mb_s"] == pytest.approx(2.0)


# ---- wiring: config, server, status view, metrics -------------------------------------------------


def test_config_switch_and_server_limiter():
    from prefetchd.config import Config
    from prefetchd.errors import ConfigError
    from prefetchd.stores import make_limiter

    config = Config.load()
    assert config.get("s3.get_concurrency") == "adaptive"
    adaptive = make_limiter(config.tree["s3"])
    assert (adaptive.limit, adaptive.maximum, adaptive.minimum, adaptive.adaptive) == (32, 32, 2, True)
    fixed = make_limiter(Config.load(None, ["s3.get_concurrency=fixed", "s3.max_concurrency=8"]).tree["s3"])
    assert (fixed.limit, fixed.maximum, fixed.minimum, fixed.adaptive) == (8, 8, 8, False)
    with pytest.raises(ConfigError, match="s3.get_concurrency must be one of adaptive, fixed"):
        Config.load(None, ["s3.get_concurrency=sometimes"])


def test_server_status_and_reload_keep_one_limiter_for_every_job():
    from prefetchd.config import Config
    from prefetchd.server import Server

    async def main():
        overrides = ["s3.max_concurrency=20"]
        config = Config.load(None, ["s3.max_concurrency=10"])
        server = Server(config, reload=lambda: Config.load(None, overrides))
        try:
            limiter = server.stores.limiter
            server.reload_config()  # never throttled: the limit follows the new maximum
            c = server.status()["concurrency"]
            assert (c["limit"], c["maximum"]) == (20, 20)
            limiter.on_throttle()
            c = server.status()["concurrency"]
            assert (c["limit"], c["maximum"], c["throttles"], c["decreases"], c["adaptive"]) == (14, 20, 1, 1, True)
            overrides[:] = ["s3.max_concurrency=40"]
            server.reload_config()  # throttled: the limit stays where S3 pushed it, counts carry on
            c = server.status()["concurrency"]
            assert (c["limit"], c["maximum"], c["throttles"], c["decreases"]) == (14, 40, 1, 1)
            overrides[:] = ["s3.max_concurrency=8", "s3.get_concurrency=fixed"]
            server.reload_config()
            c = server.status()["concurrency"]
            assert (c["limit"], c["maximum"], c["minimum"], c["adaptive"]) == (8, 8, 8, False)
            assert server.stores.limiter is limiter  # attached jobs hold it: one limit for all jobs
        finally:
            server.pool.shutdown(wait=False)
    run(main())


def test_a_probe_the_limit_never_reached_is_taken_back():
    async def main():
        clock = Clock()
        lim = AdaptiveConcurrency(16, minimum=2, initial=6, clock=clock)
        await fill(lim)
        lim.on_success(10_000_000)
        clock.advance(1.0)
        lim.on_success(0)  # saturated window closes: probe one step up
        assert lim.limit == 7
        while lim.inflight > 1:  # demand drops: the new limit is never reached
            await lim.__aexit__(None, None, None)
        clock.advance(1.0)
        lim.on_success(0)
        assert lim.limit == 6 and lim.snapshot()["increases"] == 1  # no ratchet without evidence
    run(main())


def test_status_view_shows_one_concurrency_line():
    from prefetchd.status_view import concurrency_line

    snap = {"limit": 12, "maximum": 32, "minimum": 2, "inflight": 12, "throttles": 3, "decreases": 1,
            "increases": 4, "throughput_mb_s": 85.0, "adaptive": True}
    assert concurrency_line(snap) == "12/32 (3 throttles, 1 decrease, 4 increases)"
    fixed = dict(snap, limit=32, minimum=32, throttles=1, decreases=0, increases=0, adaptive=False)
    assert concurrency_line(fixed) == "32/32 (fixed, 1 throttle)"


def test_metrics_export_the_limiter():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from prefetchd.metrics import make_registry

    lim = AdaptiveConcurrency(32, clock=Clock())
    lim.on_throttle()
    status = {"jobs": [], "slots": {}, "concurrency": lim.snapshot()}
    text = generate_latest(make_registry(lambda: status)).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["prefetchd_get_concurrency_limit"] == 22
    assert samples["prefetchd_get_concurrency_maximum"] == 32
    assert samples["prefetchd_throttles_total"] == 1
    assert samples["prefetchd_concurrency_decreases_total"] == 1
    assert samples["prefetchd_concurrency_increases_total"] == 0
