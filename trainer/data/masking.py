"""Block masking of patch grids for iBOT (BEiT / DINOv2 `MaskingGenerator`).

Masks are unions of random rectangles of 4+ patches with aspect ratio in [0.3, 1/0.3], added until the
requested number of patches is masked (or no rectangle fits). Randomness comes from a numpy Generator,
so a step's masks are a function of the step's seed.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int | None = None,
                 min_num_patches: int = 4, max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}×{self.width}, {self.min_num_patches}–{self.max_num_patches} "
                f"patches per block)")

    def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Add one rectangle; return how many patches it newly masked (0 when ten tries found none)."""
        for _ in range(10):
            target_area = _uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_mask_patches:
                    region[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
        """A bool [height, width] mask with about `num_masking_patches` patches set (never more)."""
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            count += delta
        return mask


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """Python's random.uniform: also for b < a (a budget below min_num_patches), unlike numpy's."""
    return a + (b - a) * rng.random()


def make_mask_generator(crop_size: int, patch_size: int) -> MaskingGenerator:
    """DINOv2's generator for global crops: blocks of at most half the patch grid."""
    side = crop_size // patch_size
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)
