"""Does DINO learn on the synthetic phenotype plates? kNN accuracy of teacher features vs random init.

    python bench/knn.py [--fields 128] [--size 256] [--iters 150] [--arch vit_pico] [key=value ...]

Generates plates with four phenotypes (prefetchd.dev.synth), starts a daemon on the local copy, trains a
small ViT on CPU through the real stream, then embeds every field with (a) the trained teacher and
(b) the same architecture at random init. Wells are split by 2×2 block (each block holds all four
phenotypes): first half of the blocks is the kNN reference, second half is held out. Prints both
accuracies. Not a timed test.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
TRAIN_OVERRIDES = [
    "train.batch_size_per_gpu=16", "train.OFFICIAL_EPOCH_LENGTH=50", "train.saveckp_freq=1000",
    "train.image_log_freq=0", "train.log_freq=10", "student.patch_size=8",
    "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=4",
    "dino.head_n_prototypes=1024", "dino.head_hidden_dim=256", "dino.head_bottleneck_dim=64",
    "optim.lr=0.002", "optim.scaling_rule=none", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=2", "teacher.momentum_teacher=0.99", "s3.cache_size=160",
    "s3.prefetch_factor=2",
]


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


def backbone_of(model: SSLMetaArch) -> torch.nn.Module:
    return model.teacher.backbone.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("bench/knn.py", description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=128)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--arch", default="vit_pico")
    parser.add_argument("opts", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="knn-bench-") as tmp:
        tmp = Path(tmp)
        spec = synth.demo_spec(fields=args.fields, size=args.size)
        synth.write_plates(tmp / "plates", spec)
        dataset = f"JUMPLocal:root={tmp / 'plates' / spec.prefix}"
        daemon = DaemonProcess(tmp / "p.sock", [f"cache_dir={tmp / 'cache'}"], log_path=tmp / "daemon.log").start()
        try:
            overrides = [*TRAIN_OVERRIDES, f"train.dataset_path={dataset}", f"s3.socket={tmp / 'p.sock'}",
                         f"train.output_dir={tmp / 'checkpoints'}", f"student.arch={args.arch}",
                         f"optim.epochs={-(-args.iters // 50)}", f"train.stop_after_iters={args.iters}", *args.opts]
            t0 = time.perf_counter()
            code = train_main(["--no-wandb", "--run-name", "knn", *overrides])
            if code != 0:
                return code
            train_s = time.perf_counter() - t0
            state = load_checkpoint(find_checkpoint(tmp / "checkpoints" / "knn"))
            cfg = load_config(None, overrides)
            trained = SSLMetaArch(cfg, torch.device("cpu"))
            trained.teacher.load_state_dict(state["teacher"])
            torch.manual_seed(cfg["train"]["seed"])
            random_init = SSLMetaArch(cfg, torch.device("cpu"))
            reference, held_out = split_by_block(spec)
            with torch.no_grad():
                acc_trained = evaluate(embed_all(backbone_of(trained), cfg), reference, held_out)
                acc_random = evaluate(embed_all(backbone_of(random_init), cfg), reference, held_out)
        finally:
            daemon.stop()
    print(f"{spec.field_count} fields {args.size}px, {len(synth.PHENOTYPES)} phenotypes, "
          f"{args.arch}/8, {args.iters} iterations in {train_s:.0f} s on CPU")
    print(f"kNN (k=5, cosine) accuracy on held-out wells: trained teacher {acc_trained:.3f}, "
          f"random init {acc_random:.3f}, chance {1 / len(synth.PHENOTYPES):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
