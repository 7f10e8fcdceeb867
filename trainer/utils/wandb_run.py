"""Weights & Biases: online when logged in, offline (with a one-line notice) when not, or off."""

from __future__ import annotations

import netrc
import os
import secrets
import sys
from pathlib import Path


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_wandb_run(enabled: bool, project: str, name: str, run_dir: Path, config: dict):
    """Return a wandb run, or None when disabled. Resumes the run id stored in `run_dir`."""
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if _logged_in() else "offline"
        if mode == "offline":
            print(f"wandb: not logged in, logging offline to {run_dir / 'wandb'} "
                  "(`wandb login` then `wandb sync` to upload)", file=sys.stderr)
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                      config=config, mode=mode, settings=wandb.Settings(console="off", silent=True))
