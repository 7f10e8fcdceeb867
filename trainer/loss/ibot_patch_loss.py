"""iBOT's masked-patch loss: the student predicts, at masked patches, the teacher's targets for the
unmasked patches (DINOv2 `iBOTPatchLoss`)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.loss.sinkhorn_knopp import sinkhorn_knopp


class iBOTPatchLoss(nn.Module):  # noqa: N801 — DINOv2's name
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher_patch_tokens [n_masked, K] → targets [n_masked, K]."""
        return F.softmax((teacher_patch_tokens.float() - self.center[0]) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, masks_weight: torch.Tensor) -> torch.Tensor:
        """Per image, the mean cross-entropy over its masked patches; averaged over all images (unmasked
        images count as zero). `masks_weight` is 1 / (masked patches of the patch's image)."""
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked.float()
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Center ← EMA of the mean masked-patch output (mean over patches on each rank, then over the ranks that
        had masked patches; unchanged when none had). No host sync: the skip is a `torch.where`."""
        n = teacher_patch_tokens.shape[0]
        local_mean = teacher_patch_tokens.float().sum(0, keepdim=True) / max(n, 1)
        present = torch.full((1,), float(n > 0), device=teacher_patch_tokens.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local_mean)
            dist.all_reduce(present)
        batch_center = (local_mean / present.clamp(min=1.0)).unsqueeze(0)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(present > 0, updated, self.center))
