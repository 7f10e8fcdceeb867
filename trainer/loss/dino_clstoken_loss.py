import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs of other views.

    The center is a buffer so it travels with checkpoints; it is averaged over all ranks.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_global: int,
                n_crops: int, teacher_temp: float) -> torch.Tensor:
        """student_out: [n_crops·B, K] (global views first), teacher_out: [n_global·B, K]."""
        student = (student_out.float() / self.student_temp).chunk(n_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(n_global)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
