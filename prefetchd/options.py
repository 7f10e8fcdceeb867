"""Attach options: what a client may choose per job, on top of the daemon's `defaults:`, and the resolved
`JobSpec` every rank of a job must agree on."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

from prefetchd.channels import PHENIX_CHANNELS, parse_channels
from prefetchd.errors import ConfigError
from prefetchd.field_shape import ShapeOption, parse_shape
from prefetchd.policy import Policy
from prefetchd.preprocess import Preprocessing

ACCEPTED = ("channels", "illum", "rescale", "clahe", "cache_size", "prefetch_factor", "policy", "drop_last", "shape")

# Upper bounds on the sizes an attach request sets, checked before anything is allocated from them: no
# request may make the daemon allocate or loop in proportion to a number it sent.
MAX_WORLD_SIZE = 10**8            # ranks in one training run (a rank's schedule costs O(fields / world_size),
                                  # never O(world_size): this only refuses nonsense)
MAX_LOCAL_WORLD_SIZE = 1024       # ranks of one job on this node
MAX_BATCH_SIZE = 1 << 16          # fields per batch per rank
MAX_CACHE_SIZE = (1 << 31) - 1    # slots; the shared-memory budget (checked before allocating) binds far earlier
MAX_PREFETCH_FACTOR = 1024        # batches ahead per rank
MAX_EPOCH = 1 << 14               # the epoch a `next` names: the planner's reference times (epoch × reads per
                                  # epoch) stay inside int64, and a jump far ahead costs the planner little


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
    cache_size = _bounded_int("cache_size", merged["cache_size"], 1, MAX_CACHE_SIZE)
    prefetch_factor = _bounded_int("prefetch_factor", merged["prefetch_factor"], 0, MAX_PREFETCH_FACTOR)
    policy = Policy.parse(merged["policy"])
    if not isinstance(merged["drop_last"], bool):
        raise ConfigError(f"drop_last must be true or false, got {merged['drop_last']!r}")
    preprocessing = Preprocessing.from_options(
        illum=merged["illum"], rescale=merged.get("rescale", False), clahe=merged.get("clahe")
    )
    channels = _channels(requested.get("channels"))
    return AttachOptions(channels, preprocessing, cache_size, prefetch_factor, policy, merged["drop_last"],
                         parse_shape(merged.get("shape")))


def check_attach_sizes(batch_size: Any, rank: Any, world_size: Any, local_world_size: Any) -> None:
    """The sizes of an attach request, bounded before the daemon plans or allocates anything from them."""
    world_size = _bounded_int("world_size", world_size, 1, MAX_WORLD_SIZE)
    _bounded_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    _bounded_int("local_world_size", local_world_size, 1, MAX_LOCAL_WORLD_SIZE)
    _bounded_int("rank", rank, 0, world_size - 1)


def _bounded_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer >= {low} and <= {high}, got {_short(value)}")
    return value


def _channels(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        return parse_channels(value)
    raise ConfigError(f"channels must be a list of channel names or a comma-separated string like 'DNA,ER,RNA', "
                      f"got {_short(value)}; accepted channels: {', '.join(PHENIX_CHANNELS)}")


def _short(value: Any) -> str:
    return reprlib.repr(value)
