"""Training configuration: built-in YAML defaults, then a YAML file, then `key=value` overrides.

Keys are validated against the defaults, so a typo names the accepted keys instead of being ignored (the
mechanism is prefetchd/yaml_config.py, shared with the daemon's config; the table below is the trainer's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prefetchd.policy import Policy
from prefetchd.yaml_config import Schema, get, nest
from trainer.errors import TrainerError

__all__ = ["CHOICES", "DEFAULTS", "FREE_FORM", "REQUIRED", "get", "load_config", "load_defaults", "main", "merge",
           "nest", "parse_override"]

DEFAULTS = Path(__file__).parent / "configs" / "ssl_default_config.yaml"
REQUIRED = ("train.dataset_path",)
CHOICES = {
    "train.multiview_mode": ("channel_as_view", "all_channels"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "student.arch": ("vit_pico", "vit_tiny", "vit_small", "vit_base"),
    "s3.policy": Policy.names(),
    "compute_precision.param_dtype": ("bf16", "fp32"),
}
# Keys computed from others (DINOv2 sets optim.lr from optim.base_lr): setting one names the key to set.
DERIVED = {
    "optim.lr": "optim.lr is computed from optim.base_lr (the lr for a global batch of 1024) and "
                "optim.scaling_rule; set optim.base_lr instead",
}
# Option blocks that may be `false` or a mapping; the daemon validates their contents.
FREE_FORM = ("s3.illum", "s3.rescale", "s3.clahe", "s3.shape")


def load_defaults() -> dict[str, Any]:
    return yaml.safe_load(DEFAULTS.read_text())


SCHEMA = Schema(load_defaults(), choices=CHOICES, free_form=FREE_FORM, required=REQUIRED, derived=DERIVED,
                error=TrainerError, example="optim.epochs=10")
parse_override = SCHEMA.parse_override


def merge(base: dict, update: dict) -> dict:
    return SCHEMA.merge(base, update)


def load_config(path: str | Path | None = None, overrides: list[str] = (), require: bool = True,
                base: dict | None = None) -> dict:
    """Defaults ← `base` (e.g. a checkpoint's config) ← file ← overrides, validated.

    Missing required keys are errors when `require`.
    """
    return SCHEMA.load(path, overrides, base=base, require=require)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.config [--config FILE] [--get KEY ...] [key=value ...]`: validate, print values.

    Used by the launcher to fail on a bad config before it starts a daemon.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser("trainer.config")
    parser.add_argument("--config")
    parser.add_argument("--get", action="append", default=[], metavar="KEY")
    parser.add_argument("--no-require", action="store_true", help="do not require train.dataset_path")
    parser.add_argument("opts", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.opts, require=not args.no_require)
        for key in args.get:
            try:
                print(get(cfg, key))
            except (KeyError, TypeError):
                raise TrainerError(f"unknown config key {key!r}") from None
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
