"""Export a checkpoint's backbone as a timm VisionTransformer: weights anyone can load.

    python -m trainer.export --checkpoint checkpoints/<run> [--output DIR] [--weights teacher|student]

Writes DIR (default `<run>/export/`) with `model.safetensors`, `model.pth` (the same state dict) and a timm
`config.json`, then prints how to load it:

    timm.create_model("local-dir:DIR", pretrained=True)
    timm.create_model("vit_small_patch8_224", pretrained=True, **model_args,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors", num_classes=0))

Keys are timm's. The DINOv2 layout maps one to one except with registers: timm's `reg_tokens` models use
`no_embed_class=True` (no position embedding on prefix tokens), so the class token's position embedding is
folded into the class token, as timm does for DINOv2's own register checkpoints. The mask token (training
only) is dropped. The model's input is what the trainer fed it: crops standardised per image and channel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.config import load_defaults, merge
from trainer.errors import TrainerError
from trainer.models import ARCHS, in_chans_for
from trainer.utils.checkpoint import find_checkpoint, load_checkpoint

# A registered timm name per architecture; model_args set every size explicitly, so any patch size works.
TIMM_ARCHITECTURE = {
    "vit_pico": "vit_small_patch8_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch8_224",
    "vit_base": "vit_base_patch8_224",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--output", default=None, help="output directory (default: <run>/export)")
    parser.add_argument("--weights", choices=("teacher", "student"), default="teacher")
    return parser


def backbone_state_dict(state: dict, weights: str) -> dict[str, torch.Tensor]:
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in state[weights].items() if k.startswith(prefix)}


def to_timm_state_dict(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2-layout backbone keys → timm VisionTransformer keys."""
    out = {k: v.detach().clone().contiguous() for k, v in backbone.items() if k not in ("mask_token", "register_tokens")}
    if "register_tokens" in backbone:
        out["reg_token"] = backbone["register_tokens"].detach().clone().contiguous()
        out["cls_token"] = (backbone["cls_token"] + backbone["pos_embed"][:, :1]).contiguous()
        out["pos_embed"] = backbone["pos_embed"][:, 1:].detach().clone().contiguous()
    return out


def timm_model_args(cfg: dict) -> dict:
    """The `timm.create_model` keyword arguments that rebuild the trained backbone."""
    student = cfg["student"]
    embed_dim, depth, num_heads = ARCHS[student["arch"]]
    registers = student["num_register_tokens"]
    return {
        "img_size": cfg["crops"]["global_crops_size"], "patch_size": student["patch_size"],
        "in_chans": in_chans_for(cfg), "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
        "mlp_ratio": 4.0, "qkv_bias": True, "init_values": student["layerscale"] or None,
        "reg_tokens": registers, "no_embed_class": registers > 0, "class_token": True, "global_pool": "token",
        "num_classes": 0, "dynamic_img_size": True,
    }


def timm_config(cfg: dict, state: dict, weights: str) -> dict:
    """timm's config.json (what `save_config_for_hf` writes), plus how the trainer fed the model."""
    args = timm_model_args(cfg)
    size = args["img_size"]
    return {
        "architecture": TIMM_ARCHITECTURE[cfg["student"]["arch"]],
        "num_classes": 0,
        "num_features": args["embed_dim"],
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [args["in_chans"], size, size], "fixed_input_size": False, "num_classes": 0,
            "mean": [0.0] * args["in_chans"], "std": [1.0] * args["in_chans"], "interpolation": "bilinear",
            "crop_pct": 1.0, "first_conv": "patch_embed.proj", "classifier": "head",
        },
        "trainer": {
            "weights": weights, "iteration": state["iteration"], "channels": state["channels"],
            "multiview_mode": cfg["train"]["multiview_mode"],
            "input": "uint16 fields as float, standardised per image and channel (zero mean, unit variance); "
                     "channel_as_view models take one channel (or the channel mean) at a time",
        },
    }


def export(checkpoint: Path, output: Path | None, weights: str = "teacher") -> Path:
    from safetensors.torch import save_file

    path = find_checkpoint(checkpoint)
    state = load_checkpoint(path)
    cfg = merge(load_defaults(), state["config"])
    output = output or path.parents[1] / "export"
    output.mkdir(parents=True, exist_ok=True)
    tensors = to_timm_state_dict(backbone_state_dict(state, weights))
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    torch.save(tensors, output / "model.pth")
    (output / "config.json").write_text(json.dumps(timm_config(cfg, state, weights), indent=2) + "\n")
    return output


def load_instructions(output: Path) -> str:
    config = json.loads((output / "config.json").read_text())
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    return (f"import timm\n"
            f"model = timm.create_model(\"local-dir:{output}\", pretrained=True)\n"
            f"# or, with the weights file alone:\n"
            f"model = timm.create_model(\"{config['architecture']}\", pretrained=True, {args},\n"
            f"                          pretrained_cfg_overlay=dict(file=\"{output / 'model.safetensors'}\", "
            f"num_classes=0))")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if not Path(args.checkpoint).exists():
            raise TrainerError(f"checkpoint {args.checkpoint} does not exist")
        output = export(Path(args.checkpoint), Path(args.output) if args.output else None, args.weights)
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the {args.weights} backbone as a timm VisionTransformer to {output}/ "
          f"(model.safetensors, model.pth, config.json); load it with:\n{load_instructions(output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
