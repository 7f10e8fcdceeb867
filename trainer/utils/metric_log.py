"""Per-step metrics to `<run>/logs/log.txt` (one JSON object a line), wandb, and a TTY progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricLog:
    def __init__(self, run_dir: Path, total_iters: int, wandb_run=None, progress: bool | None = None):
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "logs" / "log.txt"
        self.file = self.path.open("a")
        self.total_iters = total_iters
        self.wandb_run = wandb_run
        self.progress = sys.stderr.isatty() if progress is None else progress

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                               step=metrics["iteration"])
        if self.progress:
            self._draw(metrics)

    def log_images(self, name: str, images, iteration: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: [wandb.Image(img) for img in images]}, step=iteration)

    def _draw(self, m: dict) -> None:
        done = m["iteration"] / max(self.total_iters, 1)
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        sys.stderr.write(
            f"\r[{bar}] {m['iteration']}/{self.total_iters} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"{m['samples_per_s']:.1f} samples/s data-wait {100 * m['data_wait_share']:.0f}%  "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.progress:
            sys.stderr.write("\n")
        self.file.close()
