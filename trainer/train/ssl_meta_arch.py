"""Student and EMA teacher, DINO + KoLeo objective, one optimisation step."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from trainer.layers.dino_head import DINOHead
from trainer.loss import DINOLoss, KoLeoLoss
from trainer.models import build_model_from_cfg
from trainer.train.multicrop_wrapper import MultiCropWrapper

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: dict, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.device = device
        dino = cfg["dino"]
        backbone = build_model_from_cfg(cfg)
        head = DINOHead(backbone.embed_dim, dino["head_n_prototypes"], dino["head_nlayers"],
                        dino["head_hidden_dim"], dino["head_bottleneck_dim"])
        self.student = MultiCropWrapper(backbone, head).to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss = DINOLoss(dino["head_n_prototypes"]).to(device)
        self.koleo_loss = KoLeoLoss()
        # Not registered as a submodule: the DDP wrapper would duplicate the student in state_dict().
        object.__setattr__(self, "student_forward", self.student)

    def wrap_distributed(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            object.__setattr__(self, "student_forward",
                               nn.parallel.DistributedDataParallel(self.student, device_ids=ids))

    def compile_backbones(self) -> None:
        # In place (nn.Module.compile), so state_dict keys and checkpoints do not change.
        self.student.backbone.compile()
        self.teacher.backbone.compile()

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.cfg["compute_precision"]["param_dtype"]]
        if self.device.type != "cuda" or dtype == torch.float32:
            return nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def forward_backward(self, crops: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        n_global, n_local = crops["n_global"], crops["n_local"]
        with self.autocast():
            with torch.no_grad():
                teacher_out, _ = self.teacher(crops["global_crops"])
            student_out, student_global_cls = self.student_forward(crops["global_crops"], crops["local_crops"])
            dino_loss = self.dino_loss(student_out, teacher_out, n_global, n_global + n_local, teacher_temp)
            loss = self.cfg["dino"]["loss_weight"] * dino_loss
            losses = {"dino_loss": dino_loss.detach()}
            koleo_weight = self.cfg["dino"]["koleo_loss_weight"]
            if koleo_weight > 0:
                koleo = sum(self.koleo_loss(c) for c in student_global_cls.chunk(n_global)) / n_global
                loss = loss + koleo_weight * koleo
                losses["koleo_loss"] = koleo.detach()
        loss.backward()
        self.dino_loss.update_center(teacher_out)
        losses["loss"] = loss.detach()
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        student = list(self.student.parameters())
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self
