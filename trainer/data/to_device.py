"""prefetchd batches → float tensors on the training device, never through 8 bits."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def images_to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint16 [B, C, H, W] (a read-only shared-memory view) → float32 on `device`.

    The view is wrapped without a copy and never written; the only host copy is the transfer to the
    GPU (or, on CPU, the float conversion). The uint16 tensor must not outlive the batch.
    """
    with warnings.catch_warnings():
        # The array is read-only by design (shared memory owned by the daemon); we only read it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        view = torch.from_numpy(images)
    return view.to(device).float()


def trainer_clahe_options(source) -> dict | None:
    """The CLAHE the daemon left to us (`clahe.where: trainer`), or None."""
    clahe = getattr(source, "preprocessing", {}).get("clahe")
    if not clahe or clahe.get("where") != "trainer":
        return None
    return {"clip_limit": clahe["clip_limit"], "tile_grid": clahe["tile_grid"], "bins": clahe["bins"]}


def images_to_device_with_clahe(images: np.ndarray, device: torch.device, clahe: dict | None) -> torch.Tensor:
    """As `images_to_device`, applying the daemon-deferred CLAHE on the device first (same pixels as the
    daemon's CPU kernel, within 1 of 65,535)."""
    if clahe is None:
        return images_to_device(images, device)
    from prefetchd.preprocess.clahe_torch import clahe_torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        view = torch.from_numpy(images)
    return clahe_torch(view.to(device), **clahe).float()


def normalize_per_channel(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image and per channel zero mean, unit variance: stains differ by orders of magnitude.

    In place: a batch of full fields is large, and the float tensor is ours (never the shm view).
    """
    std, mean = torch.std_mean(x, dim=(-2, -1), keepdim=True)
    return x.sub_(mean).div_(std.add_(eps))
