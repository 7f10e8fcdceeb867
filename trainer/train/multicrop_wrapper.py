import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Backbone + head over all views in one forward call (DDP needs one forward per backward).

    Views of one resolution go through the backbone together; the head sees all class tokens at once.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None):
        global_cls = self.backbone(global_crops)
        cls = global_cls if local_crops is None else torch.cat([global_cls, self.backbone(local_crops)])
        return self.head(cls), global_cls
