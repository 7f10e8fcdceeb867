"""The sample order of every rank, computed identically by the daemon and the trainer.

A seeded permutation of all fields per epoch, sharded like `torch.utils.data.DistributedSampler`:
without `drop_last` the permutation is padded with its own head so every rank gets the same number of
samples (a few fields appear twice per epoch); with `drop_last` the tail is dropped instead, and so is
a rank's last incomplete batch.
"""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=4)
def permutation(n_fields: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of all fields (read-only: cached, since every rank of a job shards the same one,
    and a 3M-field permutation costs most of a second)."""
    rng = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch)]))
    order = rng.permutation(n_fields).astype(np.int64)
    order.flags.writeable = False
    return order


def samples_per_rank(n_fields: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return n_fields // world_size
    return math.ceil(n_fields / world_size)


def schedule(
    n_fields: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    drop_last: bool = False,
) -> np.ndarray:
    """Field indices rank `rank` consumes in `epoch`, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n_fields <= 0:
        return np.zeros(0, dtype=np.int64)
    order = permutation(n_fields, seed, epoch)
    per_rank = samples_per_rank(n_fields, world_size, drop_last)
    # Positions rank, rank + world_size, ... of the permutation padded by repeating its head (as
    # DistributedSampler pads): indexed directly, so the work and memory are O(per_rank), never O(world_size).
    positions = rank + world_size * np.arange(per_rank, dtype=np.int64)
    mine = order[positions % n_fields] if per_rank * world_size > n_fields else order[positions]
    if drop_last:
        mine = mine[: (len(mine) // batch_size) * batch_size]
    return mine


def num_batches(n_fields: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_rank = samples_per_rank(n_fields, world_size, drop_last)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
