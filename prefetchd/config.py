"""Daemon configuration: built-in YAML defaults, then a YAML file, then `key=value` overrides.

Every key is validated against the defaults: an unknown key names the accepted ones, a wrong type
names the expected type.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prefetchd.errors import ConfigError

_CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "defaults.policy": ("lru", "belady"),
    "s3.verify_md5": ("auto", True, False),
    "s3.retry_mode": ("adaptive", "standard", "legacy"),
    "s3.get_concurrency": ("adaptive", "fixed"),
    "s3.get_transport": ("auto", "obstore", "aiohttp", "botocore"),
}


def load_defaults() -> dict[str, Any]:
    text = resources.files("prefetchd").joinpath("default_config.yaml").read_text()
    return yaml.safe_load(text)


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (for example s3.max_concurrency=64)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def merge(base: dict, update: dict, *, path: str = "", schema: dict | None = None) -> dict:
    """Recursively merge `update` into a copy of `base`, validating keys against `schema` (= base)."""
    schema = base if schema is None else schema
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = f"{path}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config key {full!r}; accepted keys here: {', '.join(sorted(schema))}"
            )
        ref = schema[key]
        if isinstance(ref, dict) and isinstance(value, dict) and not _is_free_form(full):
            out[key] = merge(out.get(key) or {}, value, path=full + ".", schema=ref)
        else:
            out[key] = _check_type(full, value, ref)
    return out


def _is_free_form(path: str) -> bool:
    # Option blocks that can also be `false`, e.g. defaults.clahe, are validated by their consumers.
    return path in ("defaults.clahe", "defaults.rescale")


def _check_type(path: str, value: Any, ref: Any) -> Any:
    if path in _CHOICES:
        if not isinstance(value, (bool, str)) or value not in _CHOICES[path]:
            accepted = ", ".join(str(v).lower() if isinstance(v, bool) else v for v in _CHOICES[path])
            raise ConfigError(f"{path} must be one of {accepted}, got {value!r}")
        return value
    if ref is None or value is None or _is_free_form(path):
        return value
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
    elif isinstance(ref, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if isinstance(ref, int) and not isinstance(ref, bool) and float(value) != int(value):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path} must be >= 0, got {value!r}")
        value = type(ref)(value)
    elif isinstance(ref, str) and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def set_dotted(tree: dict, key: str, value: Any) -> dict:
    parts = key.split(".")
    update: dict = {}
    node = update
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(tree, update)


@dataclass
class Config:
    """The daemon's settings, resolved (environment and XDG paths applied)."""

    tree: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> "Config":
        tree = load_defaults()
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must be a mapping of keys, got {type(loaded).__name__}")
            tree = merge(tree, loaded)
        for item in overrides:
            tree = set_dotted(tree, *parse_override(item))
        return cls(tree)

    def get(self, dotted: str) -> Any:
        node: Any = self.tree
        for part in dotted.split("."):
            node = node[part]
        return node

    @property
    def socket_path(self) -> Path:
        return resolve_socket(self.tree.get("socket"), serving=True)

    @property
    def cache_dir(self) -> Path:
        if self.tree.get("cache_dir"):
            return Path(self.tree["cache_dir"]).expanduser()
        return default_cache_dir()

    @property
    def decode_workers(self) -> int:
        return int(self.tree["decode"]["workers"]) or (os.cpu_count() or 1)


def default_cache_dir() -> Path:
    if os.environ.get("CACHE_DIRECTORY"):  # set by systemd's CacheDirectory=
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "prefetchd"


SERVICE_SOCKET = Path("/run/prefetchd/prefetchd.sock")


def resolve_socket(explicit: str | os.PathLike | None = None, *, serving: bool = False) -> Path:
    """--socket, else $PREFETCHD_SOCKET, else $RUNTIME_DIRECTORY (inside the systemd service), else the
    per-user $XDG_RUNTIME_DIR/prefetchd/prefetchd.sock, falling back to the service's socket."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("PREFETCHD_SOCKET"):
        return Path(os.environ["PREFETCHD_SOCKET"]).expanduser()
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "prefetchd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/prefetchd-{os.getuid()}"
    personal = Path(runtime) / "prefetchd" / "prefetchd.sock"
    if not serving and not personal.exists() and SERVICE_SOCKET.exists():
        return SERVICE_SOCKET  # the node's systemd service, when this user runs no daemon of their own
    return personal
