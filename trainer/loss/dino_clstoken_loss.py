"""DINO's class-token loss: cross-entropy between teacher targets and student predictions."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.loss.sinkhorn_knopp import sinkhorn_knopp


class DINOLoss(nn.Module):
    """Teacher targets come from `softmax_center_teacher` (centering, the center an EMA buffer that travels
    with checkpoints, averaged over all ranks) or `sinkhorn_knopp_teacher`; `forward` sums the
    cross-entropies of every (student, teacher) pair it is given."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list) -> torch.Tensor:
        """Σ over pairs of the batch-mean cross-entropy −Σ_k t_k log softmax(s / student_temp)_k."""
        total = 0.0
        for s in student_output_list:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_output.shape[0])], device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count.clamp(min=1.0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
