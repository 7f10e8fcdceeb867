import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Backbone + DINO head (+ separate iBOT head) over all views in one forward call (DDP needs one
    forward per backward). State-dict keys follow DINOv2: `backbone.*`, `dino_head.*`, `ibot_head.*`.

    Returns a dict:
    - `global_cls`: class tokens of the global crops before the head [n_global·B, D] (for KoLeo);
    - `global_cls_after_head` [n_global·B, K], `local_cls_after_head` [n_local·B, K] (when local crops);
    - `masked_patch_after_head` [n_masked, K'] (when `mask_indices` is given): the head's output for the
      patch tokens at `mask_indices` (flat indices into [n_global·B · N]).
    The student passes `masks` (those patches enter as the mask token); the teacher passes only
    `mask_indices`, so it predicts the same patches from the unmasked crops.
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, mask_indices: torch.Tensor | None = None) -> dict:
        features = self.backbone(global_crops, masks, is_training=True)
        global_cls = features["x_norm_clstoken"]
        tokens = [global_cls]
        if local_crops is not None:
            tokens.append(self.backbone(local_crops))
        patches = None
        if mask_indices is not None:
            patches = features["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_head is None:  # shared head: one call over class and patch tokens
                tokens.append(patches)
        after_head = self.dino_head(torch.cat(tokens)).split([t.shape[0] for t in tokens])
        out = {"global_cls": global_cls, "global_cls_after_head": after_head[0]}
        if local_crops is not None:
            out["local_cls_after_head"] = after_head[1]
        if patches is not None:
            out["masked_patch_after_head"] = after_head[-1] if self.ibot_head is None else self.ibot_head(patches)
        return out
