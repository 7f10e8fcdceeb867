"""Per-field embeddings from a checkpoint's teacher, one parquet row per field: plate, well, site, vector.

    python -m trainer.embed --checkpoint checkpoints/<run> --output embeddings.parquet [key=value ...]

The whole field is resized so its shorter side is `crops.global_crops_size` (area averaging).
channel_as_view models embed each channel on its own; the vector is the concatenation in channel order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import load_defaults, merge, nest, parse_override
from trainer.data.source import make_source
from trainer.data.to_device import images_to_device_with_clahe, normalize_per_channel, trainer_clahe_options
from trainer.errors import TrainerError
from trainer.models import build_model_from_cfg
from trainer.utils.checkpoint import check_channels, find_checkpoint, load_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("trainer.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--output", default="embeddings.parquet")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size_per_gpu")
    parser.add_argument("--weights", choices=("teacher", "student"), default="teacher")
    parser.add_argument("opts", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.dataset_path=JUMPLocal:root=DIR s3.socket=PATH")
    return parser


def build_backbone(state: dict, weights: str, cfg: dict, device: torch.device) -> torch.nn.Module:
    backbone = build_model_from_cfg(cfg)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state[weights].items() if k.startswith(prefix)})
    return backbone.to(device).eval()


def resize_field(x: torch.Tensor, size: int, patch_size: int) -> torch.Tensor:
    """Shorter side → `size`, both sides multiples of the patch size, aspect ratio kept."""
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    shape = [max(patch_size, round(side * scale / patch_size) * patch_size) for side in (H, W)]
    return F.interpolate(x, size=shape, mode="area")


@torch.no_grad()
def embed_batch(backbone, images: torch.Tensor, cfg: dict) -> torch.Tensor:
    x = resize_field(normalize_per_channel(images), cfg["crops"]["global_crops_size"], cfg["student"]["patch_size"])
    if cfg["train"]["multiview_mode"] == "channel_as_view":
        return torch.cat([backbone(x[:, c:c + 1]) for c in range(x.shape[1])], dim=1)
    return backbone(x)


def split_id(field_id: str) -> tuple[str, str, int]:
    plate, well, site = field_id.rsplit("/", 2)
    return plate, well, int(site)


def embed(state: dict, cfg: dict, weights: str, output: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    backbone = build_backbone(state, weights, cfg, device)
    source = make_source(cfg, rank=0, world_size=1)
    rows: dict[str, np.ndarray] = {}
    try:
        for batch in source.epoch(0):
            if batch.images.shape[1] != len(state["channels"]):
                raise TrainerError(f"the dataset gives {batch.images.shape[1]} channels per field but the "
                                   f"checkpoint was trained on {len(state['channels'])} "
                                   f"({', '.join(state['channels'])})")
            images = images_to_device_with_clahe(batch.images, device, trainer_clahe_options(source))
            vectors = embed_batch(backbone, images, cfg).float().cpu().numpy()
            rows.update(zip(batch.ids, vectors))
    finally:
        source.close()
    ids = sorted(rows)
    plates, wells, sites = zip(*(split_id(i) for i in ids)) if ids else ((), (), ())
    table = pa.table({
        "plate": pa.array(plates, pa.string()), "well": pa.array(wells, pa.string()),
        "site": pa.array(sites, pa.int32()),
        "vector": pa.array([rows[i].astype(np.float32) for i in ids], pa.list_(pa.float32())),
    })
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, output)
    return len(ids)


def load_for_embedding(checkpoint: str, opts: list[str], batch_size: int | None) -> tuple[dict, dict]:
    state = load_checkpoint(find_checkpoint(Path(checkpoint)))
    cfg = merge(load_defaults(), state["config"])
    for item in opts:
        cfg = merge(cfg, nest(*parse_override(item)))
    check_channels(state, cfg["train"]["channels"], "train.channels")
    cfg["train"]["drop_last"] = False  # every field gets a row
    if batch_size:
        cfg["train"]["batch_size_per_gpu"] = batch_size
    return state, cfg


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_intermixed_args(argv)
    try:
        if not Path(args.checkpoint).exists():
            raise TrainerError(f"checkpoint {args.checkpoint} does not exist")
        state, cfg = load_for_embedding(args.checkpoint, args.opts, args.batch_size)
        count = embed(state, cfg, args.weights, Path(args.output))
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} embeddings to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
