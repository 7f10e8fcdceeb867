"""Offline hit-rate bounds of a demand-fetch cache over a known schedule: what `belady` prefetching must match
(MIN) and what `lru` can do, per epoch. Used by the tests of the planners and by the benchmark's tables; kept
out of the planner package so that the benchmark's processes do not import the daemon's data path."""

from __future__ import annotations

import collections
import heapq

import numpy as np

from prefetchd.policy import Policy
from prefetchd.schedule import schedule


def schedule_sequence(n: int, epochs: int, seed: int, batch_size: int) -> list[np.ndarray]:
    """World size 1's sample order, epoch by epoch."""
    return [schedule(n, seed, e, 0, 1, batch_size, False) for e in range(epochs)]


def simulate(per_epoch: list[np.ndarray], cache: int, policy: Policy | str) -> list[float]:
    """Hit rate per epoch of an offline cache of `cache` fields (demand fetch) under `lru` or `belady` (MIN)."""
    policy = Policy.parse(policy)
    seq = np.concatenate(per_epoch) if per_epoch else np.zeros(0, np.int64)
    bounds = np.cumsum([0] + [len(e) for e in per_epoch])
    hits = _lru_hits(seq, cache) if policy is Policy.LRU else _min_hits(seq, cache)
    return [float(hits[bounds[e]:bounds[e + 1]].mean()) if bounds[e + 1] > bounds[e] else 0.0
            for e in range(len(per_epoch))]


def _lru_hits(seq: np.ndarray, cache: int) -> np.ndarray:
    hits = np.zeros(len(seq), bool)
    od: collections.OrderedDict[int, None] = collections.OrderedDict()
    for i, f in enumerate(seq.tolist()):
        if f in od:
            hits[i] = True
            od.move_to_end(f)
        else:
            od[f] = None
            if len(od) > cache:
                od.popitem(last=False)
    return hits


def _min_hits(seq: np.ndarray, cache: int) -> np.ndarray:
    nxt = np.full(len(seq), np.iinfo(np.int64).max, np.int64)
    last: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        f = int(seq[i])
        nxt[i] = last.get(f, np.iinfo(np.int64).max)
        last[f] = i
    hits = np.zeros(len(seq), bool)
    resident: dict[int, int] = {}   # field -> next use
    heap: list[tuple[int, int]] = []  # (-next use, field), lazy
    for i, f in enumerate(seq.tolist()):
        if f in resident:
            hits[i] = True
        elif len(resident) >= cache:
            while True:
                neg, g = heapq.heappop(heap)
                if resident.get(g) == -neg:
                    del resident[g]
                    break
        resident[f] = int(nxt[i])
        heapq.heappush(heap, (-int(nxt[i]), f))
    return hits


def bounds_for(n: int, cache: int, epochs: int, batch_size: int) -> dict:
    """C/N and the per-epoch hit rates of offline MIN and LRU over world size 1's schedule (seed 0)."""
    seq = schedule_sequence(n, epochs, 0, batch_size)
    return {"c_over_n": min(1.0, cache / n), **{p.value: simulate(seq, cache, p) for p in (Policy.BELADY, Policy.LRU)}}
