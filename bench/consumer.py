"""A consumer with a configurable demand (a simulated GPU step) that measures how long it waits for data.

    result = consume(batches, demand=50.0)     # fields/s the "GPU" can eat; None/0 = as fast as possible

For each batch: the time spent waiting for it (stall), then a simulated step: the batch is copied once into a
preallocated buffer (as `tensor.to(device)` would read it) and the consumer sleeps for the rest of
`len(batch) / demand` seconds. Stall share = waiting time / wall time. `fields/s` = fields / wall time.
Works with any iterator of objects exposing `.images` (numpy or torch [B, C, H, W]) or (images, ...) tuples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np


@dataclass
class ConsumerResult:
    fields: int = 0
    batches: int = 0
    wall_s: float = 0.0
    stall_s: float = 0.0
    first_batch_s: float = 0.0
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # (t since start, waited s, fields)
    max_pixel: int = 0

    @property
    def fields_per_s(self) -> float:
        return self.fields / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def stall_share(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_stall_share(self) -> float:
        """Stall share after the first batch (the cold start is reported as first_batch_s)."""
        if len(self.timeline) < 2:
            return 0.0
        waited = sum(w for _, w, _ in self.timeline[1:])
        span = self.wall_s - self.first_batch_s
        return waited / span if span > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"fields": self.fields, "batches": self.batches, "wall_s": self.wall_s, "stall_s": self.stall_s,
                "stall_share": self.stall_share, "steady_stall_share": self.steady_stall_share,
                "fields_per_s": self.fields_per_s,
                "first_batch_s": self.first_batch_s, "max_pixel": self.max_pixel}


def _as_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "numpy") and not isinstance(images, np.ndarray):
        return images.numpy()
    return np.asarray(images)


def consume(batches: Iterable[Any], demand: float | None = None, copy: bool = True,
            on_batch=None) -> ConsumerResult:
    """Drain `batches`; `on_batch(batch)` is called right after each arrives (accounting hooks)."""
    result = ConsumerResult()
    buffer: np.ndarray | None = None
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        got = time.perf_counter()
        waited = got - asked
        if result.batches == 0:
            result.first_batch_s = got - start
        images = _as_numpy(batch.images if hasattr(batch, "images") else batch["image"] if isinstance(batch, dict)
                           else batch[0])
        n = images.shape[0]
        result.fields += n
        result.batches += 1
        result.stall_s += waited
        result.timeline.append((got - start, waited, n))
        if on_batch is not None:
            on_batch(batch)
        if copy:
            if buffer is None or buffer.shape[1:] != images.shape[1:] or buffer.shape[0] < n \
                    or buffer.dtype != images.dtype:
                buffer = np.empty((max(n, buffer.shape[0] if buffer is not None else 0), *images.shape[1:]),
                                  images.dtype)
            np.copyto(buffer[:n], images)
            result.max_pixel = max(result.max_pixel, int(buffer[:n, :, 0, :8].max()))
        if demand:
            step = n / demand - (time.perf_counter() - got)
            if step > 0:
                time.sleep(step)
    result.wall_s = time.perf_counter() - start
    return result
