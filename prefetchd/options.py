"""Attach options: what a client may choose per job, on top of the daemon's `defaults:`, and the resolved
`JobSpec` every rank of a job must agree on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefetchd.channels import parse_channels
from prefetchd.errors import ConfigError
from prefetchd.field_shape import ShapeOption, parse_shape
from prefetchd.policy import Policy
from prefetchd.preprocess import Preprocessing

ACCEPTED = ("channels", "illum", "rescale", "clahe", "cache_size", "prefetch_factor", "policy", "drop_last", "shape")


@dataclass(frozen=True)
class AttachOptions:
    channels: tuple[str, ...] | None
    preprocessing: Preprocessing
    cache_size: int
    prefetch_factor: int
    policy: Policy
    drop_last: bool
    shape: ShapeOption | None = None      # make every field one size (field_shape.py); None: they must be


@dataclass(frozen=True)
class JobSpec:
    """Everything that fixes a job's sample order and pixels; all ranks of a job must agree on it."""

    job: str
    dataset: str
    seed: int
    world_size: int
    batch_size: int
    drop_last: bool
    cache_size: int
    prefetch_factor: int
    policy: Policy
    preprocessing: Preprocessing
    channels: tuple[str, ...]
    shape: ShapeOption | None = None

    def differences(self, other: "JobSpec") -> list[str]:
        return [name for name in self.__dataclass_fields__ if getattr(self, name) != getattr(other, name)]


def resolve_options(requested: dict[str, Any], defaults: dict[str, Any]) -> AttachOptions:
    unknown = sorted(set(requested) - set(ACCEPTED))
    if unknown:
        raise ConfigError(f"unknown attach option(s) {', '.join(unknown)}; accepted: {', '.join(ACCEPTED)}")
    merged = {**defaults, **{k: v for k, v in requested.items() if v is not None}}
    cache_size = _positive_int("cache_size", merged["cache_size"])
    prefetch_factor = _positive_int("prefetch_factor", merged["prefetch_factor"], allow_zero=True)
    policy = Policy.parse(merged["policy"])
    if not isinstance(merged["drop_last"], bool):
        raise ConfigError(f"drop_last must be true or false, got {merged['drop_last']!r}")
    preprocessing = Preprocessing.from_options(
        illum=merged["illum"], rescale=merged.get("rescale", False), clahe=merged.get("clahe")
    )
    channels = parse_channels(requested["channels"]) if requested.get("channels") else None
    return AttachOptions(channels, preprocessing, cache_size, prefetch_factor, policy, merged["drop_last"],
                         parse_shape(merged.get("shape")))


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
    return value
