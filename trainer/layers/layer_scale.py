import torch
from torch import nn


class LayerScale(nn.Module):
    """Per-channel residual-branch scale, initialised small (`student.layerscale`, e.g. 1e-5)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
