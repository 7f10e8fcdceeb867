"""iBOT masks for a batch of global crops, laid out as DINOv2's `collate_data_and_cast` does."""

from __future__ import annotations

import numpy as np
import torch

from trainer.data.masking import MaskingGenerator


def collate_masks(n_images: int, mask_generator: MaskingGenerator, mask_ratio_tuple: tuple[float, float],
                  mask_probability: float, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`int(n_images · mask_probability)` images get a block mask, with mask ratios spread evenly over
    `mask_ratio_tuple` (image i draws from the i-th of equal sub-ranges); the rest are unmasked; the
    order is shuffled.

    Returns `masks` (bool [n_images, N]), `mask_indices_list` (flat indices of masked patches),
    `masks_weight` (1 / masked patches of the patch's image, one per masked patch) and
    `n_masked_patches` (long [1]).
    """
    N = mask_generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    probs = np.linspace(*mask_ratio_tuple, n_masked_images + 1)
    masks = [mask_generator(int(N * rng.uniform(probs[i], probs[i + 1])), rng) for i in range(n_masked_images)]
    masks += [mask_generator(0, rng) for _ in range(n_images - n_masked_images)]
    order = rng.permutation(n_images)
    collated = torch.from_numpy(np.stack(masks)[order].reshape(n_images, N))
    mask_indices_list = collated.flatten().nonzero().flatten()
    masks_weight = (1 / collated.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated)[collated]
    return {
        "masks": collated,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), mask_indices_list.shape[0], dtype=torch.long),
    }
