"""The schedule is the contract between daemon and trainer: deterministic, sharded, padded like DDP."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prefetchd.schedule import num_batches, schedule


@given(n=st.integers(1, 500), world=st.integers(1, 8), batch=st.integers(1, 16), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50))
@settings(max_examples=150, deadline=None)
def test_ranks_partition_the_epoch_like_distributed_sampler(n, world, batch, seed, epoch):
    shards = [schedule(n, seed, epoch, r, world, batch) for r in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    everything = np.concatenate(shards)
    assert set(everything.tolist()) == set(range(n))       # every field at least once
    assert len(everything) - n == per_rank * world - n     # duplicates only from padding
    assert all(len(s) == 0 or num_batches(n, world, batch, False) == -(-len(s) // batch) for s in shards)


@given(n=st.integers(1, 500), world=st.integers(1, 8), batch=st.integers(1, 16))
@settings(max_examples=100, deadline=None)
def test_drop_last_drops_the_tail_and_short_batches(n, world, batch):
    shards = [schedule(n, 3, 1, r, world, batch, drop_last=True) for r in range(world)]
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat)            # no field twice
    assert all(len(s) % batch == 0 for s in shards)
    assert all(len(s) // batch == num_batches(n, world, batch, True) for s in shards)


def test_same_arguments_same_order_and_epochs_reshuffle():
    a = schedule(1000, 42, 3, 1, 4, 8)
    np.testing.assert_array_equal(a, schedule(1000, 42, 3, 1, 4, 8))
    assert not np.array_equal(a, schedule(1000, 42, 4, 1, 4, 8))
    assert not np.array_equal(a, schedule(1000, 43, 3, 1, 4, 8))


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank must be in"):
        schedule(10, 0, 0, 4, 4, 2)
