"""The real trainer as the benchmark's consumer.

`run_trainer(job)` runs the trainer's own CLI entry point in-process (`trainer.train.train.main`: config → SSLMetaArch
→ AdamW → `TrainLoop.run`, i.e. the same `_step` a training run takes: uint16 → float, per-channel normalisation,
batched multi-crop augmentation, DINO + KoLeo forward/backward, gradient clipping, AdamW, EMA teacher, a JSON line
per step in `<run>/logs/log.txt`). Model and crops are `configs/test_tiny.yaml` (vit_pico, 32² global / 16² local
crops) so a step is short on CPU; the batches are the bench's full-size fields.

Data sources, one per run (bench.compare runs the like-for-like pair; `prefetchd`, `baseline-guide` and
`s3torch-u16` work too):
- prefetchd: the trainer's own `make_source` → `prefetchd.client.attach` to a daemon this function starts against
  the bench's S3 endpoint (the latency proxy); preprocessing as `prefetchd-opencv` (illum off, rescale off, 65,536-bin
  CLAHE: the same 16-bit pixels as `baseline-u16`).
- baseline: the JUMP guide's DataLoader (`bench.baselines.jump_guide`, 8 workers, prefetch 2, persistent workers,
  IMREAD_UNCHANGED + OpenCV uint16 CLAHE) behind `LoaderSource`, an adapter with the stream interface TrainLoop uses
  (`batches_per_epoch`, `epoch(e, start_batch)`, `status()`, `close()`, `preprocessing`).

`TrainLoop.run` builds its source with `trainer.train.train.make_source`; for the baseline that one name is swapped
for the adapter (the trainer has no parameter for a foreign source). Everything else is the trainer's code.
Numbers come from the trainer's own per-step log (`step_s`, `data_wait_s`, samples), plus the source set-up time
(attach, or DataLoader construction) measured around `make_source`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from trainer.data.synthetic import Batch   # what TrainLoop reads of a batch

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "test_tiny.yaml"
OPENCV_CLAHE = "{clip_limit: 3.0, tile_grid: 8, bins: 65536}"  # prefetchd-opencv's CLAHE (= cv2 uint16 CLAHE)


class _WithIds(Dataset):
    """The guide's dataset, each sample also carrying its field id (the trainer logs the first id per step)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        sample = self.inner[i]
        sample["id"] = self.inner.fields[i][0]
        return sample


class LoaderSource:
    """The baseline DataLoader behind the stream interface TrainLoop consumes. One persistent loader, as in
    bench.compare's baseline runs; its shuffle order is the loader's, not prefetchd's schedule."""

    def __init__(self, dataset, batch_size: int, seed: int):
        from bench.baselines.jump_guide import make_loader

        wrapped = _WithIds(dataset)
        self.fields = len(dataset)
        self.loader = make_loader(wrapped, batch_size, seed=seed, epoch=0)
        self.batches_per_epoch = len(self.loader)
        self.preprocessing: dict = {}  # CLAHE done by the workers: nothing left for the trainer
        self.acct = np.zeros(8)
        self.full_hits = 0
        self.channels = len(dataset.fields[0][1])

    def epoch(self, epoch: int, start_batch: int = 0):
        for index, batch in enumerate(self.loader):
            if index < start_batch:
                continue
            a = batch["acct"].numpy()
            self.acct += a.sum(axis=0)
            self.full_hits += int((a[:, 6] >= self.channels - 1e-9).sum())
            yield Batch(list(batch["id"]), batch["image"].numpy(), epoch, index)

    def status(self) -> dict:
        return {"gets": int(self.acct[4]), "bytes": int(self.acct[5]), "full_hits": self.full_hits}

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # join the persistent workers now, so their CPU is reaped into this process
        self.loader = None


class _Observed:
    """Delegates to a source; keeps its last status() before close() (the trainer closes it itself)."""

    def __init__(self, inner):
        self._inner = inner
        self.final_status: dict = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.final_status = self._inner.status() or {}
        self._inner.close()


def trainer_overrides(job: dict, dataset: str, socket: str | None, out_dir: Path) -> list[str]:
    n, bs = len(job["fields"]), job["batch_size"]
    epochs = job.get("trainer_epochs", 1)
    over = [
        f"train.dataset_path={dataset}",
        f"train.batch_size_per_gpu={bs}",
        f"train.OFFICIAL_EPOCH_LENGTH={math.ceil(n / bs)}",   # one trainer epoch = one pass over the data
        f"train.output_dir={out_dir}",
        f"train.seed={job['seed']}",
        "train.saveckp_freq=1000000",                          # one checkpoint, at the end
        "train.log_freq=1",
        "train.image_log_freq=0",
        f"optim.epochs={epochs}",
        "optim.warmup_epochs=0",
        "teacher.warmup_teacher_temp_epochs=0",
        f"s3.cache_size={job['cache_size']}",
        "s3.prefetch_factor=2",
    ]
    if job["system"] == "prefetchd-opencv":  # `prefetchd` keeps the daemon's default preprocessing
        over += ["s3.illum=false", "s3.rescale=false", f"s3.clahe={OPENCV_CLAHE}"]
    if socket:
        over.append(f"s3.socket={socket}")
    return over


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(steps: list[dict], source_s: float) -> dict:
    """Totals over the trainer's per-step log. The loop's wall = source set-up + Σ step_s (each step_s runs from
    asking for the batch to the end of the optimiser step); data wait = set-up + Σ data_wait_s."""
    if not steps:
        return {"steps": 0}
    step_s = np.array([s["step_s"] for s in steps])
    wait_s = np.array([s["data_wait_s"] for s in steps])
    samples = np.array([s["samples_per_s"] * s["step_s"] for s in steps])
    wall = source_s + float(step_s.sum())
    steady = float(step_s[1:].sum())
    return {
        "steps": len(steps), "samples": int(round(samples.sum())), "loop_s": wall, "source_s": source_s,
        "data_wait_s": source_s + float(wait_s.sum()),
        "steps_per_s": len(steps) / wall, "samples_per_s": samples.sum() / wall,
        "data_wait_share": (source_s + float(wait_s.sum())) / wall,
        "steady_data_wait_share": float(wait_s[1:].sum()) / steady if steady > 0 else 0.0,
        "steady_samples_per_s": float(samples[1:].sum()) / steady if steady > 0 else 0.0,
        "first_step_s": source_s + float(step_s[0]),
        "first_batch_s": source_s + float(wait_s[0]),
        "compute_s": float((step_s - wait_s).sum()),
        "final_loss": float(steps[-1]["loss"]), "first_loss": float(steps[0]["loss"]),
    }


def run_trainer(job: dict) -> dict:
    """One trainer run fed by job['system'] (prefetchd-opencv | baseline-u16); called inside bench.compare's
    --run-one subprocess, so the process tree measured is trainer + its DataLoader workers or its daemon."""
    from bench.accounting import proc_cpu, proxy_delta, proxy_stats, tree_cpu
    from trainer.train import train as train_mod

    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 cores is the point
    system = job["system"]
    work = Path(job["workdir"])
    out_dir = Path(tempfile.mkdtemp(prefix=f"trainer-{system}-", dir=work))
    out: dict[str, Any] = {"system": system, "consumer": "trainer"}
    me = os.getpid()
    daemon = None
    made: dict[str, Any] = {}
    real_make_source = train_mod.make_source
    if system.startswith("prefetchd"):
        from prefetchd.dev.daemon_process import DaemonProcess

        sock = Path(tempfile.mkdtemp(prefix="pft-", dir=work)) / "d.sock"
        overrides = [f"s3.endpoint_url={job['endpoint']}", f"cache_dir={work / f'index-trainer-{me}'}",
                     "log_level=warning", *job.get("overrides", [])]
        t0 = time.perf_counter()
        daemon = DaemonProcess(sock, overrides, log_path=work / f"daemon-trainer-{system}.log").start()
        out["daemon_start_s"] = time.perf_counter() - t0
        dataset = f"JUMPS3MultiView:bucket={job['bucket']}:prefix={job['prefix']}"

        def make_source(cfg, rank, world_size):
            t0 = time.perf_counter()
            src = _Observed(real_make_source(cfg, rank, world_size))  # the trainer's own attach
            made["source_s"], made["source"] = time.perf_counter() - t0, src
            return src
    else:
        from bench.baselines.jump_guide import JumpGuideDataset, S3TorchFieldDataset

        sock = None
        dataset = "JUMPGuideDataLoader"  # not parsed: make_source is the adapter below

        def make_source(cfg, rank, world_size):
            t0 = time.perf_counter()
            fields = [tuple(f) for f in job["fields"]]
            if system == "s3torch-u16":
                ds = S3TorchFieldDataset(fields, job["bucket"], job["endpoint"])
            else:
                ds = JumpGuideDataset(fields, job["bucket"], job["endpoint"],
                                      mode="guide" if system == "baseline-guide" else "u16")
            src = _Observed(LoaderSource(ds, cfg["train"]["batch_size_per_gpu"], cfg["train"]["seed"]))
            made["source_s"], made["source"] = time.perf_counter() - t0, src
            return src

    argv = ["--config", str(TINY_CONFIG), "--run-name", "run", "--no-wandb",
            *trainer_overrides(job, dataset, str(sock) if sock else None, out_dir)]
    train_mod.make_source = make_source
    console = out_dir / "trainer-console.txt"  # the trainer's prints (log/checkpoint paths, errors), off the bench's
    try:
        px = proxy_stats(job["proxy_stats"])
        cpu0, own0 = tree_cpu(me), proc_cpu(me)
        t0 = time.perf_counter()
        with open(console, "w") as con, contextlib.redirect_stdout(con), contextlib.redirect_stderr(con):
            rc = train_mod.main(argv)
        out["main_s"] = time.perf_counter() - t0
        cpu1, own1 = tree_cpu(me), proc_cpu(me)
        delta, _ = proxy_delta(job["proxy_stats"], px)
    finally:
        train_mod.make_source = real_make_source
        if daemon is not None:
            daemon.stop()
    if rc != 0:
        raise RuntimeError(f"trainer exited {rc}: {console.read_text()[-2000:]}")
    steps = read_log(out_dir / "run" / "logs" / "log.txt")
    out.update(summarize(steps, made.get("source_s", 0.0)))
    out["tree_cpu_s"] = cpu1 - cpu0          # whole tree over the trainer's main(): trainer + workers | daemon
    out["trainer_cpu_s"] = own1 - own0       # the trainer process alone (its step, plus the loader's main side)
    out["loader_cpu_s"] = out["tree_cpu_s"] - out["trainer_cpu_s"]
    out["proxy_requests"], out["proxy_bytes"] = delta.get("requests", 0), delta.get("bytes_down", 0)
    out["source_status"] = {k: v for k, v in (made["source"].final_status or {}).items()
                            if isinstance(v, (int, float, str))}
    out["torch_threads"] = __import__("torch").get_num_threads()
    out["epochs_run"] = job.get("trainer_epochs", 1)
    out["steps_log"] = [{k: s[k] for k in ("iteration", "step_s", "data_wait_s", "loss")} for s in steps]
    return out


def main(argv: list[str] | None = None) -> int:
    """Stand-alone: `python -m bench.trainer_consumer JOB.json` (normally run through bench.compare)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job")
    a = ap.parse_args(argv)
    print(json.dumps(run_trainer(json.loads(Path(a.job).read_text())), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
