"""The shipped recipe on a GPU: step throughput, data wait, memory, and the field rate the daemon must sustain.

    python -m bench.gpu_step [--steps 300] [--dataset DATASET] [--socket PATH] [--fields 256] [--size 1080]
                             [key=value ...]

Runs `configs/dinov3_vits8_jump_s3_multiview.yaml` (ViT-S/8, 2 × 224 + 8 × 96 crops, DINO + iBOT + KoLeo,
Sinkhorn-Knopp) through the trainer's own entry point, with bf16 autocast and `torch.compile`, on prefetchd's
stream: a running daemon (`--socket`) on `--dataset`, or, by default, a daemon this command starts on
synthetic full-size plates it writes first (`--fields` fields of `--size`² pixels; with a GPU, CLAHE runs on
it: `clahe.where: trainer`). Prints, over the steps after warm-up (compilation included in warm-up):
crop sets/s per GPU, the median step, the data-wait share, peak GPU memory, and the fields/s one GPU (and a
node of 8) makes the daemon deliver. Without a GPU it runs a reduced version (smaller crops and batch, a few
steps, float32, no compile) and says so: those are not GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefetchd.dev import synth
from prefetchd.dev.daemon_process import DaemonProcess
from trainer.train.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "dinov3_vits8_jump_s3_multiview.yaml"
GPUS_PER_NODE = 8
JUMP_FIELD_BYTES = 5 * 1080 * 1080 * 2
CPU_REDUCTION = ["crops.global_crops_size=112", "crops.local_crops_size=48", "train.batch_size_per_gpu=4",
                 "compute_precision.param_dtype=fp32", "train.compile=false"]


def summarize(log_path: Path, warmup: int, samples_per_field: int) -> dict:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    steady = rows[warmup:] or rows[-1:]
    step_s = statistics.median(r["step_s"] for r in steady)
    fields = statistics.median(r["fields_per_s"] * r["step_s"] for r in steady)  # fields per step, all ranks
    total_s = sum(r["step_s"] for r in steady)
    return {
        "steps": len(steady), "step_s": step_s,
        "crop_sets_per_s": fields * samples_per_field / step_s,
        "fields_per_s": fields / step_s,
        "data_wait_share": sum(r["data_wait_s"] for r in steady) / total_s,
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("bench.gpu_step", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: 300 on a GPU, 6 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (default: 20 on "
                                                                 "a GPU, 2 on CPU)")
    parser.add_argument("--dataset", default=None, help="dataset string for a running daemon (with --socket)")
    parser.add_argument("--socket", default=None, help="a running daemon's socket (default: start one)")
    parser.add_argument("--fields", type=int, default=None, help="synthetic fields (default: 256 GPU, 16 CPU)")
    parser.add_argument("--size", type=int, default=None, help="synthetic field side (default: 1080 GPU, 256 CPU)")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    gpu = torch.cuda.is_available()
    steps = args.steps or (300 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    fields, size = args.fields or (256 if gpu else 16), args.size or (1080 if gpu else 256)
    if (args.dataset is None) != (args.socket is None):
        parser.error("--dataset and --socket go together (a running daemon and what it serves)")
    if gpu:
        device = f"GPU: {torch.cuda.get_device_name()}"
        mode = ["compute_precision.param_dtype=bf16", "train.compile=true", "s3.clahe={where: trainer}"]
    else:
        device = "no GPU: REDUCED CPU run (112/48-pixel crops, 4 fields per step, float32, no compile); not GPU figures"
        mode = CPU_REDUCTION
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        tmp = Path(tmp)
        daemon = None
        if args.socket is None:
            spec = synth.demo_spec(fields=fields, size=size)
            t0 = time.perf_counter()
            synth.write_plates(tmp / "plates", spec)
            print(f"wrote {spec.field_count} synthetic fields of {size}² in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
            dataset, socket = f"JUMPLocal:root={tmp / 'plates' / spec.prefix}", tmp / "p.sock"
            daemon = DaemonProcess(socket, [f"cache_dir={tmp / 'cache'}"], log_path=tmp / "daemon.log").start()
        else:
            dataset, socket = args.dataset, Path(args.socket)
        overrides = [f"train.dataset_path={dataset}", f"s3.socket={socket}", f"train.output_dir={tmp / 'runs'}",
                     f"train.stop_after_iters={steps}", "train.saveckp_freq=1000000", "train.image_log_freq=0",
                     *mode, *args.opts]
        try:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            with contextlib.redirect_stdout(sys.stderr):  # the trainer's log/checkpoint lines: off the summary
                code = train_main(["--config", str(RECIPE), "--no-wandb", "--run-name", "gpu-step", *overrides])
            if code != 0:
                return code
            peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
            from trainer.config import load_config

            cfg = load_config(RECIPE, overrides)
            result = summarize(tmp / "runs" / "gpu-step" / "logs" / "log.txt", warmup, cfg["train"]["samples_per_field"])
        finally:
            if daemon is not None:
                daemon.stop()
    train = cfg["train"]
    print(f"device: {device}")
    print(f"recipe: {RECIPE.relative_to(REPO)} ({cfg['student']['arch']}/{cfg['student']['patch_size']}, "
          f"2 × {cfg['crops']['global_crops_size']} + {cfg['crops']['local_crops_number']} × "
          f"{cfg['crops']['local_crops_size']} crops, {train['batch_size_per_gpu']} fields × "
          f"{train['samples_per_field']} crop sets per step, iBOT {cfg['ibot']['loss_weight'] > 0}, "
          f"{train['centering']})")
    print(f"steps measured: {result['steps']} (after {warmup} warm-up steps); loss {result['loss_first']:.3f} → "
          f"{result['loss_last']:.3f}")
    unit = "GPU" if gpu else "process"
    print(f"crop sets/s per {unit}: {result['crop_sets_per_s']:.1f} (median step {result['step_s'] * 1000:.0f} ms)")
    print(f"data-wait share: {100 * result['data_wait_share']:.1f}%")
    print(f"peak GPU memory: {peak:.2f} GiB" if peak is not None else "peak GPU memory: n/a (CPU)")
    node = GPUS_PER_NODE * result["fields_per_s"]
    print(f"fields/s the daemon must deliver: {result['fields_per_s']:.1f} per {unit}, {node:.0f} for a node of "
          f"{GPUS_PER_NODE} GPUs ({node * JUMP_FIELD_BYTES / 1e9:.2f} GB/s of decoded 5 × 1080² uint16 JUMP fields)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
