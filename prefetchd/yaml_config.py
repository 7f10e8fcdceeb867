"""Validated YAML configuration, shared by the daemon (`prefetchd/config.py`) and the trainer
(`trainer/config.py`): built-in YAML defaults ← a YAML file ← `key=value` overrides.

The defaults are the schema: every key must exist there, and a value takes the type of its default. An
unknown key names the accepted keys at that level, a wrong type names the expected type, a key with a fixed
set of values names them. Errors are one line and raised as the user's error class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from prefetchd.errors import ConfigError


@dataclass(frozen=True)
class Schema:
    defaults: dict[str, Any]                                  # the built-in YAML: every accepted key and its type
    choices: Mapping[str, tuple] = field(default_factory=dict)   # dotted key -> the accepted values
    free_form: tuple[str, ...] = ()       # dotted keys (false or a mapping) whose contents their consumer checks
    required: tuple[str, ...] = ()        # dotted keys that must end up set (not null or empty)
    derived: Mapping[str, str] = field(default_factory=dict)  # dotted key computed from others -> what to set
    non_negative: bool = False            # numbers must be >= 0
    error: type[Exception] = ConfigError
    example: str = "section.key=value"    # an override, shown when one is not key=value

    def load(self, path: str | Path | None = None, overrides: Iterable[str] = (), *, base: dict | None = None,
             require: bool = True) -> dict[str, Any]:
        """Defaults ← `base` (e.g. a checkpoint's config) ← the file at `path` ← `overrides`, validated."""
        tree = copy.deepcopy(self.defaults)
        if base is not None:
            tree = self.merge(tree, base)
        if path is not None:
            tree = self.merge(tree, self.read_file(path))
        for item in overrides:
            tree = self.merge(tree, nest(*self.parse_override(item)))
        missing = [key for key in self.required if require and get(tree, key) in (None, "")]
        if missing:
            raise self.error(f"missing config key {', '.join(missing)}: set it in the config file or as "
                             f"{missing[0]}=…")
        return tree

    def read_file(self, path: str | Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise self.error(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise self.error(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.error(f"config file {path} must be a mapping of keys, got {type(data).__name__}")
        return data

    def parse_override(self, item: str) -> tuple[str, Any]:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise self.error(f"override {item!r} is not key=value (for example {self.example})")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        return key.strip(), value

    def merge(self, base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
        """`update` merged into a copy of `base`, each key validated against `base` (the schema so far)."""
        out = copy.deepcopy(base)
        for key, value in update.items():
            full = f"{path}{key}"
            if key not in base:
                accepted = ", ".join(f"{path}{k}" for k in base)
                raise self.error(f"unknown config key {full!r}; accepted keys here: {accepted}")
            ref = base[key]
            if isinstance(ref, dict) and full not in self.free_form:
                if not isinstance(value, dict):
                    raise self.error(f"{full} is a section ({', '.join(ref)}), got {value!r}")
                out[key] = self.merge(ref, value, full + ".")
            else:
                out[key] = self.check(full, value, ref)
        return out

    def check(self, path: str, value: Any, ref: Any) -> Any:
        """`value` for the key `path` whose default is `ref`, converted to its type, or an error naming it."""
        if path in self.derived and value is not None:
            raise self.error(self.derived[path])
        if path in self.choices:
            accepted = self.choices[path]
            if not isinstance(value, (bool, str)) or value not in accepted:
                names = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in accepted)
                raise self.error(f"{path} must be one of {names}, got {value!r}")
            return value
        if ref is None or value is None or path in self.free_form:
            return value
        if isinstance(ref, bool):
            if not isinstance(value, bool):
                raise self.error(f"{path} must be true or false, got {value!r}")
        elif isinstance(ref, (int, float)):
            value = _yaml11_float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(f"{path} must be a number, got {value!r}")
            if isinstance(ref, int) and float(value) != int(value):
                raise self.error(f"{path} must be an integer, got {value!r}")
            if self.non_negative and value < 0:
                raise self.error(f"{path} must be >= 0, got {value!r}")
            value = type(ref)(value)
        elif isinstance(ref, list) and not isinstance(value, list):
            if not isinstance(value, str):
                raise self.error(f"{path} must be a list, got {value!r}")
            value = [v.strip() for v in value.split(",")]
        elif isinstance(ref, str) and not isinstance(value, str):
            raise self.error(f"{path} must be a string, got {value!r}")
        return value


def nest(key: str, value: Any) -> dict[str, Any]:
    """`a.b.c`, v -> {a: {b: {c: v}}}."""
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as text; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
