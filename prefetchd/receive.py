"""A field received straight into its slot, on worker threads: the event loop's part is one hand-off per field.

With a transport that reads on threads (`thread_get.py`), a fill does not bring the channels' bytes to the event
loop and then hand them to the decode pool. One task per field (`field_pool`) starts its channels' GETs (`pool`)
and each channel thread reads its body:

- into the slot's plane itself when the channel needs no preprocessing and the object is a plain uncompressed
  TIFF plane of the field's shape: the first bytes (header and IFD, `decode.plane_layout`) go to a small buffer,
  the pixels straight into the slot, the rest (if any) through the small buffer. One copy, by the kernel.
- else into a buffer from a pool of reused buffers (no page faults on fresh memory), which `decode_tiff` reads in
  place and the preprocessing writes from into the plane.

Retries, the length and MD5 checks and the error messages are `S3Store.read_blocking`'s (the same as `get`); the
GET limiter is held for the field's channels on the event loop; the counts are added there once the field is
done. A cancelled fill (the job closing) stops its GETs (`thread_get.Abort`) and waits for its threads before
the cancellation goes on, so no thread writes into an arena that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future, wait
from typing import Any

import numpy as np

from prefetchd.counters import FetchCounters
from prefetchd.decode import decode_tiff, place_channel, plane_layout
from prefetchd.field_shape import ShapeOption
from prefetchd.index import Field
from prefetchd.preprocess import Preprocessing

HEAD = 64 << 10      # bytes read before the TIFF's layout decides where the rest goes


def receives_in_threads(store: Any) -> bool:
    """Whether `store` can read on worker threads (an S3 store on the `threads` transport)."""
    getter = getattr(store, "getter", None)
    return getattr(getter, "field_pool", None) is not None and hasattr(store, "read_blocking")


async def receive_field(store: Any, field: Field, illums: list[np.ndarray | None], preprocessing: Preprocessing,
                        out: np.ndarray, fit: ShapeOption | None = None) -> None:
    """Fetch `field`'s channels and write them, preprocessed (and made the slot's size as `fit` says), into `out`
    (uint16 [C, H, W], a slot)."""
    from prefetchd.thread_get import Abort

    getter = store.getter
    await getter.prepare()
    loop = asyncio.get_running_loop()
    counts = FetchCounters()
    abort = Abort()

    def on_throttle() -> None:
        loop.call_soon_threadsafe(store._throttled)

    async with contextlib.AsyncExitStack() as permits:
        width = await _take_permits(store.semaphore, len(field.keys), permits)
        store.counters.inflight += width
        job = loop.run_in_executor(getter.field_pool, _receive, store, field, illums, preprocessing, fit,
                                   out, counts, on_throttle, abort, width)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            abort.trigger()
            while not job.done():    # the threads write into the slot: the arena must outlive them
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(job)
            raise
        finally:
            store.counters.inflight -= width
            _add(store, counts)


async def _take_permits(semaphore: Any, wanted: int, stack: contextlib.AsyncExitStack) -> int:
    """GET permits for one field: the first in its turn, then up to `wanted` - 1 more only if they are free at
    once (waiting for more while holding some would deadlock fields against each other once throttling lowers
    the limit below a field's channels). The field's GETs run that many at a time."""
    await stack.enter_async_context(semaphore)
    got = 1
    while got < wanted:
        try_acquire = getattr(semaphore, "try_acquire", None)
        if try_acquire is not None:            # prefetchd.concurrency.AdaptiveConcurrency
            if not try_acquire():
                break
            stack.push_async_exit(semaphore.__aexit__)
        elif isinstance(semaphore, asyncio.Semaphore) and not semaphore.locked():
            await semaphore.acquire()          # free: returns without waiting
            stack.callback(semaphore.release)
        else:
            break
        got += 1
    return got


def _add(store: Any, counts: FetchCounters) -> None:
    c = store.counters
    c.gets += counts.gets
    c.retries += counts.retries
    c.errors += counts.errors
    if counts.bytes_fetched:
        c.add_bytes(counts.bytes_fetched)
        on_success = getattr(store.semaphore, "on_success", None)
        if on_success is not None:
            on_success(counts.bytes_fetched)


def _receive(store: Any, field: Field, illums, preprocessing: Preprocessing, fit: ShapeOption | None,
             out: np.ndarray, counts: FetchCounters, on_throttle, abort, width: int) -> None:
    """On a field thread: the channels `width` at a time (one per permit held), this thread one stripe of them,
    GET threads the others; then wait for all."""
    pool = store.getter.pool
    etags = field.etags or (None,) * len(field.keys)
    per_channel = [FetchCounters() for _ in field.keys]

    def stripe(first: int) -> None:
        for c in range(first, len(field.keys), width):
            abort.check()
            _channel(store, field.keys[c], field.sizes[c], etags[c] or None, illums[c], preprocessing, fit,
                     out[c], per_channel[c], on_throttle, abort)

    jobs: list[Future] = [pool.submit(stripe, first) for first in range(1, min(width, len(field.keys)))]
    try:
        stripe(0)
    except BaseException:
        abort.trigger()           # the field has failed: its other channels stop and give their permits back
        wait(jobs)
        raise
    finally:
        wait(jobs)
        for part in per_channel:
            counts.gets += part.gets
            counts.retries += part.retries
            counts.errors += part.errors
            counts.bytes_fetched += part.bytes_fetched
    for job in jobs:
        error = job.exception()
        if error is not None:
            abort.trigger()
            raise error


def _channel(store: Any, key: str, size: int, etag: str | None, illum: np.ndarray | None,
             preprocessing: Preprocessing, fit: ShapeOption | None, out: np.ndarray, counts: FetchCounters, on_throttle, abort) -> None:
    raw = illum is None or not preprocessing.illum
    raw = raw and preprocessing.rescale is None and preprocessing.daemon_clahe is None
    if raw and out.dtype == np.uint16 and out.flags.c_contiguous:
        sink = PlaneSink(out)
        data = store.read_blocking(key, size, etag, sink, counts=counts, on_throttle=on_throttle, abort=abort)
        if data is PLACED:
            return
    else:
        sink = BUFFERS.sink()
        data = store.read_blocking(key, size, etag, sink, counts=counts, on_throttle=on_throttle, abort=abort)
    try:
        place_channel(decode_tiff(data, name=key), illum, preprocessing, out, key, fit)
    finally:
        BUFFERS.give_back(data)


PLACED = object()    # what a sink returns when the pixels are in the slot already


class PlaneSink:
    """Reads a body into a uint16 plane when it is a plain TIFF plane of that shape; else into a buffer."""

    def __init__(self, plane: np.ndarray):
        self.plane = plane

    def __call__(self, body) -> Any:
        head = _scratch()
        first = min(body.size, HEAD)
        body.readinto(head[:first])
        layout = plane_layout(head[:first], body.size)
        if layout is None or layout[1:] != self.plane.shape:
            data = BUFFERS.take(body.size)
            data[:first] = head[:first]
            body.readinto(data[first : body.size])
            return data[: body.size]
        offset = layout[0]
        pixels = memoryview(self.plane).cast("B")
        end = offset + len(pixels)
        if offset < first:                           # the pixels began within the first bytes
            have = min(first, end) - offset
            pixels[:have] = head[offset : offset + have]
        else:
            have = 0
            body.skip(offset - first, head)
        if have < len(pixels):
            body.readinto(pixels[have:])
        rest = body.size - max(end, first)
        if rest > 0:
            body.skip(rest, head)
        return PLACED


_local = threading.local()


def _scratch() -> memoryview:
    head = getattr(_local, "head", None)
    if head is None:
        head = _local.head = memoryview(bytearray(HEAD))
    return head


class BufferPool:
    """Body buffers kept for reuse: a fresh 2.5 MB buffer costs its page faults on every fill."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return memoryview(self._free.pop(i))
        return memoryview(bytearray(size))

    def give_back(self, data: Any) -> None:
        """Return a buffer from `take` once nothing reads it any more."""
        buf = data.obj if isinstance(data, memoryview) else None
        if isinstance(buf, bytearray):
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)

    def sink(self):
        def into_buffer(body) -> memoryview:
            data = self.take(body.size)[: body.size]
            body.readinto(data)
            return data
        return into_buffer


BUFFERS = BufferPool()
