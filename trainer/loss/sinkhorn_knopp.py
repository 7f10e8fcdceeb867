"""Sinkhorn-Knopp teacher targets (SwAV, DINOv2 `train.centering: sinkhorn_knopp`).

Instead of subtracting a running center, the teacher's softmax over prototypes is balanced: a few
alternating normalisations make every prototype receive the same total weight across the global batch
(all ranks) while every sample's weights still sum to one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """teacher_output [B, K] (this rank's rows) → assignment [B, K], each row summing to 1."""
    teacher_output = teacher_output.float()
    # Subtracting the global max leaves the result unchanged (it cancels in the first normalisation)
    # and keeps exp() finite at any temperature.
    peak = teacher_output.max() if teacher_output.numel() else teacher_output.new_zeros(())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    Q = torch.exp((teacher_output - peak) / teacher_temp).t()  # K × B, as in the paper
    B = _all_reduce(torch.tensor(float(Q.shape[1]), device=Q.device))  # samples over all ranks
    K = Q.shape[0]
    Q /= _all_reduce(torch.sum(Q))
    for _ in range(n_iterations):
        Q /= _all_reduce(torch.sum(Q, dim=1, keepdim=True))  # every prototype's total weight: 1/K
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True).clamp(min=torch.finfo(Q.dtype).tiny)  # every sample: 1/B
        Q /= B
    Q *= B
    return Q.t()
