"""Optimiser parameter groups as in DINOv2: layer-wise lr decay, a patch-embedding lr multiplier, no
weight decay on biases, norms, LayerScale and tokens, and the heads' last layers apart (frozen early)."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
NO_WEIGHT_DECAY_TOKENS = ("pos_embed", "cls_token", "register_tokens", "mask_token")


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12,
                          is_backbone: bool = False) -> float:
    """lr multiplier `lr_decay_rate ** (num_layers + 1 - layer_id)`: embeddings are layer 0, block i is
    layer i + 1, the final norm and anything outside the backbone (heads) are layer num_layers + 1."""
    layer_id = num_layers + 1
    if is_backbone:
        if name.split(".")[0] in EMBEDDINGS:
            layer_id = 0
        elif name.startswith("blocks."):
            layer_id = int(name.split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model: nn.Module, lr_decay_rate: float = 1.0,
                                 patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """One entry per trainable parameter of `model` (a backbone with `.blocks`, or a head)."""
    num_layers = len(model.blocks) if hasattr(model, "blocks") else 0
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = {"params": param, "name": name, "is_last_layer": "last_layer" in name,
                 "lr_multiplier": get_vit_lr_decay_rate(name, lr_decay_rate, num_layers, num_layers > 0),
                 "wd_multiplier": 1.0}
        if (name.endswith(".bias") or "norm" in name or "gamma" in name
                or name.split(".")[0] in NO_WEIGHT_DECAY_TOKENS):
            group["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            group["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(group)
    return groups


def fuse_params_groups(groups: list[dict], keys=("lr_multiplier", "wd_multiplier", "is_last_layer")) -> list[dict]:
    """Parameters with the same multipliers share one optimiser group."""
    fused: dict[tuple, dict] = defaultdict(lambda: {"params": []})
    for group in groups:
        identity = tuple(group[k] for k in keys)
        fused[identity].update({k: group[k] for k in keys})
        fused[identity]["params"].append(group["params"])
    return list(fused.values())
