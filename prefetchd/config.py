"""Daemon configuration: built-in YAML defaults (`default_config.yaml`), then a YAML file, then `key=value`
overrides, validated by the schema shared with the trainer (`prefetchd/yaml_config.py`); the reload rules for
SIGHUP; and where the socket and the index cache live.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from prefetchd.policy import Policy
from prefetchd.yaml_config import Schema, get

CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "defaults.policy": Policy.names(),
    "s3.verify_md5": ("auto", True, False),
    "s3.retry_mode": ("adaptive", "standard", "legacy"),
    "s3.get_concurrency": ("adaptive", "fixed"),
    "s3.get_transport": ("auto", "threads", "obstore", "aiohttp", "botocore"),
}
# Option blocks that can also be `false`; their consumers (options.py, preprocess/) validate them.
FREE_FORM = ("defaults.clahe", "defaults.rescale")


def load_defaults() -> dict[str, Any]:
    text = resources.files("prefetchd").joinpath("default_config.yaml").read_text()
    return yaml.safe_load(text)


SCHEMA = Schema(load_defaults(), choices=CHOICES, free_form=FREE_FORM, non_negative=True,
                example="s3.max_concurrency=64")


@dataclass
class Config:
    """The daemon's settings, resolved (environment and XDG paths applied). It remembers where it was read
    from (`path`, `overrides`), so `reread()` (SIGHUP) reads the same file with the same overrides again."""

    tree: dict[str, Any]
    path: str | os.PathLike | None = field(default=None, compare=False)
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> "Config":
        overrides = tuple(overrides)
        return cls(SCHEMA.load(path, overrides), path, overrides)

    def reread(self) -> "Config":
        return Config.load(self.path, self.overrides)

    def get(self, dotted: str) -> Any:
        return get(self.tree, dotted)

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


# ---- reload (SIGHUP) ---------------------------------------------------------------------------------

# Config keys a SIGHUP may change live; everything else needs a restart (the old value is kept).
RELOADABLE = ("log_level", "defaults", "job", "index.wait_s", "s3.max_concurrency", "s3.get_concurrency",
              "s3.retries", "security", "illum.budget_bytes", "control")


@dataclass
class Reload:
    config: Config          # the running config with every reloadable key taken from the re-read one
    changed: list[str]      # dotted keys that changed and apply now
    ignored: list[str]      # dotted keys that changed but need a restart (the running value is kept)


def apply_reload(running: Config, fresh: Config) -> Reload:
    old, new = running.tree, fresh.tree
    changed, ignored = [], []
    for key in sorted(set(old) | set(new)):
        for path in _differing(key, old.get(key), new.get(key)):
            (changed if path.startswith(RELOADABLE) else ignored).append(path)
    tree = dict(old)
    for key in RELOADABLE:
        _set_path(tree, key, get(new, key))
    return Reload(replace(running, tree=tree), changed, ignored)


def _differing(path: str, a: Any, b: Any) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _differing(f"{path}.{key}", a.get(key), b.get(key))
    elif a != b:
        yield path


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node[part] = dict(node[part])  # copy on write: the old Config keeps its own tree
        node = node[part]
    node[parts[-1]] = value


# ---- paths -----------------------------------------------------------------------------------------

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
