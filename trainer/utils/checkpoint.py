"""Checkpoints: model, teacher, optimiser, loss centers, iteration, data position (a global sample count,
so any world size can resume) and per-rank RNG.

Written atomically by rank 0 as `<run>/ckpt/model_<iteration>.pth`; `last_checkpoint` names the newest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.errors import TrainerError

FORMAT = 2  # 2: DINOv2 module names (dino_head, ibot_head, mlp.fc1), iBOT center, data as a sample count
MAX_TO_KEEP = 3
REQUIRED = ("format", "student", "teacher", "optimizer", "iteration", "data", "channels", "config")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "ckpt"


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model_{state['iteration']:07d}.pth"
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    (folder / "last_checkpoint.tmp").write_text(path.name + "\n")
    os.replace(folder / "last_checkpoint.tmp", folder / "last_checkpoint")
    for old in sorted(folder.glob("model_*.pth"))[:-MAX_TO_KEEP]:
        old.unlink()
    return path


def find_checkpoint(target: Path) -> Path:
    """A checkpoint file, or a run directory → its last checkpoint."""
    if target.is_file():
        return target
    pointer = checkpoint_dir(target) / "last_checkpoint"
    if not pointer.is_file():
        raise TrainerError(f"no checkpoint to resume from in {target} (expected {pointer})")
    return checkpoint_dir(target) / pointer.read_text().strip()


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainerError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise TrainerError(f"checkpoint {path} is a directory without ckpt/last_checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise TrainerError(f"cannot read checkpoint {path}: not a trainer checkpoint, or truncated "
                           f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise TrainerError(f"{path} is not a trainer checkpoint (missing model/optimizer/data state)")
    if state["format"] != FORMAT:
        raise TrainerError(f"{path} has checkpoint format {state['format']} (an older DINO-only trainer); this "
                           f"trainer reads format {FORMAT}: start a new run")
    return state


def check_channels(state: dict, channels: list[str], where: str) -> None:
    if len(state["channels"]) != len(channels):
        raise TrainerError(
            f"{where} has {len(channels)} channels ({', '.join(channels)}) but the checkpoint was trained "
            f"on {len(state['channels'])} ({', '.join(state['channels'])}); use the same train.channels"
        )
