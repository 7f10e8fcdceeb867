"""Vision Transformer backbone in the DINOv2 layout, for any patch size and number of channels.

Token order: class token, `num_register_tokens` registers (no position embedding, as in DINOv2 with
registers), then the patches. `mask_token` replaces the patch embeddings of masked patches (iBOT).
"""

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
                 drop_path_uniform: bool = False, init_values: float | None = None,
                 num_register_tokens: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.num_patches_side = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches_side**2, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, init_values) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(_init_weights)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

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

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (+ bool masks [B, N]) → tokens [B, 1 + registers + N, D]."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DINOv2's output dict: normalised class, register and patch tokens."""
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:self.num_prefix_tokens],
            "x_norm_patchtokens": x_norm[:, self.num_prefix_tokens:],
        }

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, is_training: bool = False):
        """The class token after the final norm (the image embedding), or with `is_training` the
        `forward_features` dict. Going through `forward` keeps `nn.Module.compile()` in effect."""
        out = self.forward_features(x, masks)
        return out if is_training else out["x_norm_clstoken"]


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
