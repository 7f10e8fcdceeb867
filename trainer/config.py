"""Training configuration: built-in YAML defaults, then a YAML file, then `key=value` overrides.

Keys are validated against the defaults, so a typo names the accepted keys instead of being ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import TrainerError

DEFAULTS = Path(__file__).parent / "configs" / "ssl_default_config.yaml"
REQUIRED = ("train.dataset_path",)
CHOICES = {
    "train.multiview_mode": ("channel_as_view", "all_channels"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "student.arch": ("vit_pico", "vit_tiny", "vit_small", "vit_base"),
    "s3.policy": ("lru", "belady"),
    "compute_precision.param_dtype": ("bf16", "fp32"),
}
# Keys computed from others (DINOv2 sets optim.lr from optim.base_lr): setting one names the key to set.
DERIVED = {
    "optim.lr": "optim.lr is computed from optim.base_lr (the lr for a global batch of 1024) and "
                "optim.scaling_rule; set optim.base_lr instead",
}
# Option blocks that may be `false` or a mapping; the daemon validates their contents.
FREE_FORM = ("s3.illum", "s3.rescale", "s3.clahe")


def load_defaults() -> dict[str, Any]:
    return yaml.safe_load(DEFAULTS.read_text())


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise TrainerError(f"override {item!r} is not key=value (for example optim.epochs=10)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = f"{path}{key}"
        if key not in base:
            accepted = ", ".join(f"{path}{k}" for k in base)
            raise TrainerError(f"unknown config key {full!r}; accepted keys here: {accepted}")
        ref = base[key]
        if isinstance(ref, dict) and full not in FREE_FORM:
            if not isinstance(value, dict):
                raise TrainerError(f"{full} is a section ({', '.join(ref)}), got {value!r}")
            out[key] = merge(ref, value, full + ".")
        else:
            out[key] = _check_type(full, value, ref)
    return out


def _check_type(path: str, value: Any, ref: Any) -> Any:
    if path in DERIVED and value is not None:
        raise TrainerError(DERIVED[path])
    if path in CHOICES and value not in CHOICES[path]:
        raise TrainerError(f"{path} must be one of {', '.join(CHOICES[path])}, got {value!r}")
    if ref is None or value is None or path in FREE_FORM:
        return value
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise TrainerError(f"{path} must be true or false, got {value!r}")
    elif isinstance(ref, (int, float)):
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainerError(f"{path} must be a number, got {value!r}")
        if isinstance(ref, int) and float(value) != int(value):
            raise TrainerError(f"{path} must be an integer, got {value!r}")
        value = type(ref)(value)
    elif isinstance(ref, list) and not isinstance(value, list):
        value = [v.strip() for v in str(value).split(",")] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise TrainerError(f"{path} must be a list, got {value!r}")
    elif isinstance(ref, str) and not isinstance(value, str):
        raise TrainerError(f"{path} must be text, got {value!r}")
    return value


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as text; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def get(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def load_config(path: str | Path | None = None, overrides: list[str] = (), require: bool = True,
                base: dict | None = None) -> dict:
    """Defaults ← `base` (e.g. a checkpoint's config) ← file ← overrides, validated.

    Missing required keys are errors when `require`.
    """
    cfg = load_defaults()
    if base is not None:
        cfg = merge(cfg, base)
    if path is not None:
        cfg = merge(cfg, _read_yaml(Path(path)))
    for item in overrides:
        cfg = merge(cfg, nest(*parse_override(item)))
    missing = [key for key in REQUIRED if require and get(cfg, key) in (None, "")]
    if missing:
        raise TrainerError(
            f"missing config key {', '.join(missing)}: set it in the config file or as {missing[0]}=…"
        )
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TrainerError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TrainerError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainerError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


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
