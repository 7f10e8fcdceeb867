"""iBOT block masking: block shapes, mask counts and ratios, the batch layout of `collate_masks`."""

import numpy as np
import pytest
import torch
from trainer.data.collate import collate_masks
from trainer.data.masking import MaskingGenerator, make_mask_generator


def test_masks_never_exceed_the_budget_and_come_close_to_it():
    generator = make_mask_generator(224, 8)  # 28 × 28 patches, blocks of at most half of them
    rng = np.random.default_rng(0)
    assert generator.num_patches == 784 and generator.max_num_patches == 392
    for target in (0, 40, 150, 392):
        counts = [int(generator(target, rng).sum()) for _ in range(40)]
        assert max(counts) <= target
        assert np.mean(counts) >= 0.85 * target
    assert generator(0, rng).sum() == 0


def _with_masked_neighbour(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask & neighbours


def test_masks_are_blocks_not_scattered_patches():
    generator = MaskingGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(1)
    masked = contiguous = 0
    for _ in range(20):
        mask = generator(60, rng)
        masked += int(mask.sum())
        contiguous += int(_with_masked_neighbour(mask).sum())
    # Rectangles of >= 4 patches; only the last filler of a budget may be a lone patch.
    assert contiguous >= 0.95 * masked
    random_mask = np.random.default_rng(1).permutation(196) < 60
    assert _with_masked_neighbour(random_mask.reshape(14, 14)).sum() < 0.9 * 60  # the check tells them apart


def test_masks_are_a_function_of_the_generator_seed():
    generator = make_mask_generator(64, 8)
    a = generator(20, np.random.default_rng(5))
    assert np.array_equal(a, generator(20, np.random.default_rng(5)))
    assert not np.array_equal(a, generator(20, np.random.default_rng(6)))


def test_collate_masks_masks_the_requested_share_of_images_over_the_ratio_range():
    generator = make_mask_generator(224, 8)
    rng = np.random.default_rng(2)
    n_images, N = 64, 784
    out = collate_masks(n_images, generator, (0.1, 0.5), 0.5, rng)
    masks = out["masks"]
    assert masks.shape == (n_images, N) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 32  # int(64 · 0.5) images masked, the rest not at all
    ratios = sorted((counts[counts > 0].float() / N).tolist())
    # image i draws its ratio from the i-th of 32 equal sub-ranges of [0.1, 0.5]; blocks may undershoot a little
    bands = np.linspace(0.1, 0.5, 33)
    assert all(r <= 0.5 for r in ratios) and ratios[0] >= 0.08
    assert np.mean(ratios) == pytest.approx(np.mean((bands[:-1] + bands[1:]) / 2), abs=0.03)
    assert ratios[-1] > 0.4 and ratios[0] < 0.15  # the whole range is used, not one ratio
    # the masked images are spread over the batch (shuffled), not the first half
    assert 0 < int((counts[:32] > 0).sum()) < 32
    flat = masks.flatten().nonzero().flatten()
    assert torch.equal(out["mask_indices_list"], flat) and out["n_masked_patches"].item() == len(flat)
    per_patch_image = flat // N
    assert torch.allclose(out["masks_weight"], 1 / counts[per_patch_image].float())
    # the weights of one image sum to 1, so every masked image counts once in the iBOT loss
    assert float(out["masks_weight"].sum()) == pytest.approx(32.0)


def test_collate_masks_with_few_images_masks_none_or_some():
    generator = make_mask_generator(32, 8)
    none = collate_masks(1, generator, (0.1, 0.5), 0.5, np.random.default_rng(0))
    assert none["masks"].sum() == 0 and none["mask_indices_list"].numel() == 0
    some = collate_masks(4, generator, (0.1, 0.5), 0.5, np.random.default_rng(0))
    assert int((some["masks"].sum(1) > 0).sum()) == 2
