"""Vision Transformer backbone (DINO/DINOv2 layout) for any patch size and number of channels."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from trainer.layers.block import Block
from trainer.layers.patch_embed import PatchEmbed


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 8, in_chans: int = 1, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 init_values: float | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.num_patches_side = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches_side**2, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, init_values) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Resize the patch position grid for crops of another size (e.g. 96-pixel local crops)."""
        side = self.num_patches_side
        if h == side and w == side:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = grid.to(cls_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm: [B, 1 + N, D], the class token first."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


ARCHS = {
    # name: (embed_dim, depth, num_heads); vit_pico is for tests and CPU benchmarks.
    "vit_pico": (64, 2, 2),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def vit(arch: str, **kwargs) -> VisionTransformer:
    embed_dim, depth, num_heads = ARCHS[arch]
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


vit_pico = partial(vit, "vit_pico")
vit_tiny = partial(vit, "vit_tiny")
vit_small = partial(vit, "vit_small")
vit_base = partial(vit, "vit_base")
