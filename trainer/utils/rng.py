"""RNG states as tensors and plain lists, so checkpoints load with `weights_only=True`."""

from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_seed(seed: int, rank: int, iteration: int, stream: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, rank, iteration, stream) only."""
    state = np.random.SeedSequence([seed, rank, iteration, stream]).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


def step_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The crop generator of one step: a function of (seed, rank, iteration), so resumes replay it."""
    return torch.Generator().manual_seed(step_seed(seed, rank, iteration))


def step_numpy_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The iBOT mask generator of one step, independent of the crop generator."""
    return np.random.default_rng(step_seed(seed, rank, iteration, stream=1))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
