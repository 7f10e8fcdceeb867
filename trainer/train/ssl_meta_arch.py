"""Student and EMA teacher, the DINOv2 objective (DINO class-token loss, iBOT masked-patch loss,
KoLeo), one optimisation step."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import TrainerError
from trainer.layers.dino_head import DINOHead
from trainer.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from trainer.models import build_model_from_cfg
from trainer.train.multicrop_wrapper import MultiCropWrapper
from trainer.utils.param_groups import fuse_params_groups, get_params_groups_with_decay

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _head(in_dim: int, section: dict) -> DINOHead:
    return DINOHead(in_dim, section["head_n_prototypes"], section["head_nlayers"], section["head_hidden_dim"],
                    section["head_bottleneck_dim"])


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: dict, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.device = device
        dino, ibot = cfg["dino"], cfg["ibot"]
        self.do_dino = dino["loss_weight"] > 0
        self.do_koleo = dino["koleo_loss_weight"] > 0
        self.do_ibot = ibot["loss_weight"] > 0
        self.ibot_separate_head = ibot["separate_head"]
        self.centering = cfg["train"]["centering"]
        if not (self.do_dino or self.do_ibot):
            raise TrainerError("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
        backbone = build_model_from_cfg(cfg)
        ibot_head = _head(backbone.embed_dim, ibot) if self.do_ibot and self.ibot_separate_head else None
        self.student = MultiCropWrapper(backbone, _head(backbone.embed_dim, dino), ibot_head).to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self._freeze_unused()
        ibot_out_dim = ibot["head_n_prototypes"] if self.ibot_separate_head else dino["head_n_prototypes"]
        self.dino_loss = DINOLoss(dino["head_n_prototypes"]).to(device)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_out_dim).to(device)
        self.koleo_loss = KoLeoLoss()
        # Not registered as a submodule: the DDP wrapper would duplicate the student in state_dict().
        object.__setattr__(self, "student_forward", self.student)

    def _freeze_unused(self) -> None:
        """Parameters no loss reaches get no gradient (DDP refuses parameters that never receive one)."""
        if not self.do_ibot:
            self.student.backbone.mask_token.requires_grad_(False)
        if not self.do_dino and self.ibot_separate_head:
            self.student.dino_head.requires_grad_(False)

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

    def get_params_groups(self) -> list[dict]:
        """Per sub-model (backbone, heads): layer-wise lr decay, patch-embed lr multiplier, no weight decay
        on biases, norms, LayerScale and tokens; the heads' last layers in their own groups."""
        optim = self.cfg["optim"]
        groups = []
        for module in (self.student.backbone, self.student.dino_head, self.student.ibot_head):
            if module is not None:
                groups += fuse_params_groups(get_params_groups_with_decay(
                    module, optim["layerwise_decay"], optim["patch_embed_lr_mult"]))
        return groups

    @torch.no_grad()
    def teacher_targets(self, crops: dict, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets for the class tokens [n_global, B, K] (view order swapped, so the student's view
        A is matched with the teacher's view B) and for the masked patches [n_masked, K']."""
        n_global = crops["n_global"]
        out = self.teacher(crops["global_crops"], mask_indices=crops["mask_indices_list"] if self.do_ibot else None)
        cls = out["global_cls_after_head"].chunk(n_global)
        cls = torch.cat(cls[::-1])
        patches = out.get("masked_patch_after_head")
        if self.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls, teacher_temp)
            self.dino_loss.update_center(cls)
            ibot_targets = None
            if patches is not None:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(patches, teacher_temp)
                self.ibot_patch_loss.update_center(patches)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls, teacher_temp)
            ibot_targets = None if patches is None else self.ibot_patch_loss.sinkhorn_knopp_teacher(patches, teacher_temp)
        return dino_targets.view(n_global, -1, dino_targets.shape[-1]), ibot_targets

    def forward_backward(self, crops: dict, teacher_temp: float, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One forward and backward pass. `crops`: the augmentation's views (+ the iBOT masks of the global
        crops when iBOT is on). `loss_scale` 0 lets a rank take part in a step without contributing."""
        n_global, n_local = crops["n_global"], crops["n_local"]
        n_terms = n_global * (n_global - 1) + n_local * n_global
        dino_weight, koleo_weight = self.cfg["dino"]["loss_weight"], self.cfg["dino"]["koleo_loss_weight"]
        losses: dict[str, torch.Tensor] = {}
        with self.autocast():
            dino_targets, ibot_targets = self.teacher_targets(crops, teacher_temp)
            out = self.student_forward(crops["global_crops"], crops["local_crops"],
                                       masks=crops["masks"] if self.do_ibot else None,
                                       mask_indices=crops["mask_indices_list"] if self.do_ibot else None)
            loss = out["global_cls"].new_zeros((), dtype=torch.float32)
            if n_local > 0 and self.do_dino:
                local = self.dino_loss(out["local_cls_after_head"].chunk(n_local), list(dino_targets)) / n_terms
                losses["dino_local_crops_loss"] = local.detach()
                loss = loss + dino_weight * local
            if self.do_dino:
                # One call over both global views: the mean over 2B rows is the mean of the two pair terms.
                glob = self.dino_loss([out["global_cls_after_head"]], [dino_targets.flatten(0, 1)]) * n_global / n_terms
                losses["dino_global_crops_loss"] = glob.detach()
                losses["dino_loss"] = (glob + losses.get("dino_local_crops_loss", 0.0)).detach()
                loss = loss + dino_weight * glob
            if self.do_koleo:
                # Summed over the global views, never across views of one image (DINOv2).
                koleo = sum(self.koleo_loss(c) for c in out["global_cls"].chunk(n_global))
                losses["koleo_loss"] = (koleo / n_global).detach()
                loss = loss + koleo_weight * koleo
            if self.do_ibot:
                ibot = self.ibot_patch_loss.forward_masked(out["masked_patch_after_head"], ibot_targets,
                                                           crops["masks"], crops["masks_weight"])
                losses["ibot_loss"] = ibot.detach()
                loss = loss + self.cfg["ibot"]["loss_weight"] * ibot
        (loss * loss_scale).backward()
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
