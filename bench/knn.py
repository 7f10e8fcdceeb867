"""Does it learn, and does the DINOv2 recipe learn better? kNN accuracy of teacher features on held-out wells.

    python bench/knn.py [--fields 256] [--size 256] [--iters 300] [--arch vit_pico] [--runs dino,dinov2,dinov2-k4]
                        [key=value ...]

Generates plates with four phenotypes (prefetchd.dev.synth), starts a daemon on the local copy and, through the
real stream, trains the same small ViT on CPU with the same budget (iterations, crop sets per step) under:
- `dino`: DINO class-token loss + KoLeo with centering, LayerScale (what the trainer did before);
- `dinov2`: + iBOT masked-patch loss with its own head, Sinkhorn-Knopp, layer-wise lr decay, patch-embed lr
  multiplier, drop-path and 4 registers (the shipped config's choices);
- `dinov2, K=4`: the same with `train.samples_per_field=4`: a quarter of the fields per step, four crop
  sets from each, so the daemon delivers 4× fewer fields for the same number of crop sets.
Then embeds every field with each trained teacher and with the `dinov2` architecture at random init. Wells are split by
2×2 block (each block holds all four phenotypes): the first half of the blocks is the kNN reference, the
second half is held out. Prints one table. Not a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prefetchd.dev import synth
from prefetchd.dev.daemon_process import DaemonProcess
from trainer.config import load_config
from trainer.data.source import make_source
from trainer.data.to_device import images_to_device
from trainer.embed import embed_batch
from trainer.train.ssl_meta_arch import SSLMetaArch
from trainer.train.train import main as train_main
from trainer.utils.checkpoint import find_checkpoint, load_checkpoint

CROP_SETS_PER_STEP = 16
COMMON = [
    "train.OFFICIAL_EPOCH_LENGTH=50", "train.saveckp_freq=100000", "train.image_log_freq=0", "train.log_freq=10",
    "student.patch_size=8", "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=4",
    "dino.head_n_prototypes=1024", "dino.head_hidden_dim=256", "dino.head_bottleneck_dim=64",
    "ibot.head_n_prototypes=1024", "ibot.head_hidden_dim=256", "ibot.head_bottleneck_dim=64",
    "optim.base_lr=0.002", "optim.scaling_rule=none", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=2", "teacher.momentum_teacher=0.99", "s3.prefetch_factor=2",
    "student.layerscale=1e-5",
]
DINO = ["ibot.loss_weight=0", "train.centering=centering", "optim.layerwise_decay=1.0",
        "optim.patch_embed_lr_mult=1.0", "student.drop_path_rate=0.0", "student.num_register_tokens=0"]
DINOV2 = ["ibot.loss_weight=1.0", "ibot.separate_head=true", "ibot.mask_sample_probability=0.5",
          "ibot.mask_ratio_min_max=[0.1,0.5]", "train.centering=sinkhorn_knopp", "optim.layerwise_decay=0.9",
          "optim.patch_embed_lr_mult=0.2", "student.drop_path_rate=0.1", "student.num_register_tokens=4"]
RUNS = {  # name: (recipe overrides, samples_per_field)
    "dino": (DINO, 1),
    "dinov2": (DINOV2, 1),
    "dinov2-k4": (DINOV2, 4),
}
LABELS = {"dino": "DINO only (DINO + KoLeo, centering)", "dinov2": "DINOv2 recipe",
          "dinov2-k4": "DINOv2 recipe, samples_per_field 4"}


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 5) -> float:
    """Cosine k-nearest-neighbour majority vote."""
    a = train_x / (np.linalg.norm(train_x, axis=1, keepdims=True) + 1e-8)
    b = test_x / (np.linalg.norm(test_x, axis=1, keepdims=True) + 1e-8)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = train_y[nearest]
    predicted = np.array([np.bincount(row, minlength=train_y.max() + 1).argmax() for row in votes])
    return float((predicted == test_y).mean())


def embed_all(backbone: torch.nn.Module, cfg: dict) -> dict[str, np.ndarray]:
    source = make_source(cfg, rank=0, world_size=1)
    out: dict[str, np.ndarray] = {}
    try:
        for batch in source.epoch(0):
            vectors = embed_batch(backbone, images_to_device(batch.images, torch.device("cpu")), cfg)
            out.update(zip(batch.ids, vectors.numpy()))
    finally:
        source.close()
    return out


def split_by_block(spec: synth.SynthSpec) -> tuple[set[str], set[str]]:
    """Reference wells and held-out wells: whole 2×2 blocks, so both sides see every phenotype."""
    blocks = [spec.wells[i:i + 4] for i in range(0, len(spec.wells), 4)]
    half = max(1, len(blocks) // 2)
    return {w for b in blocks[:half] for w in b}, {w for b in blocks[half:] for w in b}


def evaluate(features: dict[str, np.ndarray], reference: set[str], held_out: set[str]) -> float:
    def pick(wells):
        ids = sorted(i for i in features if i.split("/")[1] in wells)
        x = np.stack([features[i] for i in ids])
        y = np.array([synth.phenotype_of(i.split("/")[1]) for i in ids])
        return x, y
    return knn_accuracy(*pick(reference), *pick(held_out))


def run_overrides(name: str, data: list[str], iters: int, extra: list[str]) -> list[str]:
    recipe, k = RUNS[name]
    return [*COMMON, *data, *recipe, f"train.samples_per_field={k}",
            f"train.batch_size_per_gpu={CROP_SETS_PER_STEP // k}", f"optim.epochs={-(-iters // 50)}",
            f"train.stop_after_iters={iters}", *extra]


def teacher_accuracy(cfg: dict, state: dict | None, reference: set[str], held_out: set[str]) -> float:
    torch.manual_seed(cfg["train"]["seed"])
    model = SSLMetaArch(cfg, torch.device("cpu"))
    if state is not None:
        model.teacher.load_state_dict(state["teacher"])
    with torch.no_grad():
        return evaluate(embed_all(model.teacher.backbone.eval(), cfg), reference, held_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("bench/knn.py", description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--arch", default="vit_pico")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the daemon decodes on the other core; spinning OpenMP threads "
                             "on a shared machine cost far more than they give)")
    parser.add_argument("--workdir", default=None, help="keep plates, logs and checkpoints here (default: a temporary "
                                                         "directory, removed at the end)")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="overrides for every run")
    args = parser.parse_intermixed_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="knn-bench-") as scratch:
        tmp = Path(args.workdir or scratch)
        spec = synth.demo_spec(fields=args.fields, size=args.size)
        synth.write_plates(tmp / "plates", spec)
        data = [f"train.dataset_path=JUMPLocal:root={tmp / 'plates' / spec.prefix}", f"s3.socket={tmp / 'p.sock'}",
                f"train.output_dir={tmp / 'checkpoints'}", f"student.arch={args.arch}",
                f"s3.cache_size={spec.field_count + 32}"]  # every field stays cached: the runs compare models
        reference, held_out = split_by_block(spec)
        daemon = DaemonProcess(tmp / "p.sock", [f"cache_dir={tmp / 'cache'}"], log_path=tmp / "daemon.log").start()
        try:
            base = load_config(None, run_overrides("dinov2", data, args.iters, args.opts))
            rows.append(("random init (DINOv2 architecture)", "-", "-", "-", 0, 0.0,
                         teacher_accuracy(base, None, reference, held_out)))
            for name in runs:
                overrides = run_overrides(name, data, args.iters, args.opts)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # the trainer's log/checkpoint lines: off the table
                    code = train_main(["--no-wandb", "--run-name", name, *overrides])
                if code != 0:
                    return code
                train_s = time.perf_counter() - t0
                cfg = load_config(None, overrides)
                state = load_checkpoint(find_checkpoint(tmp / "checkpoints" / name))
                k, batch = cfg["train"]["samples_per_field"], cfg["train"]["batch_size_per_gpu"]
                rows.append((LABELS[name], k, batch, batch * k, args.iters * batch, train_s,
                             teacher_accuracy(cfg, state, reference, held_out)))
        finally:
            daemon.stop()
    print(f"{spec.field_count} fields {args.size}px, {len(synth.PHENOTYPES)} phenotypes, {args.arch}/8, "
          f"{args.iters} iterations of {CROP_SETS_PER_STEP} crop sets on CPU; kNN (k=5, cosine) on held-out wells, "
          f"chance {1 / len(synth.PHENOTYPES):.2f}")
    print()
    print("| run | K | fields/step | crop sets/step | fields delivered | train s | kNN accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, k, batch, crop_sets, fields, train_s, acc in rows:
        print(f"| {name} | {k} | {batch} | {crop_sets} | {fields} | {train_s:.0f} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
