"""The shape of a job's fields: every slot of an arena holds [C, H, W], so one (H, W) per job.

Sources differ (Phenix 1080², ImageXpress 1024², …). The job's (H, W) is decided from a few sampled fields of
each source (the majority within a source; the index's nominal shape when none of a source's samples could be
read), never from whichever field happens to be read first. A field whose planes are not that size is:

- with no `shape` option: quarantined alone, with the sizes in the reason; a dataset whose *sources* differ is
  refused at attach with one line naming the sizes found per source;
- with `shape: {size: [H, W], mode: …}`: made that size after preprocessing at its own size (illumination
  functions, percentiles and CLAHE tiles all see the field as imaged), centred:

    crop         centre-crop; a field smaller than the size on either axis is refused (quarantined)
    pad          reflect-pad (numpy's "reflect": the edge pixel is not repeated); a larger field is refused
    crop_or_pad  per axis: centre-crop where larger, reflect-pad where smaller

  Centred means the first (h - H) // 2 rows are cut, or (H - h) // 2 rows are added before (the rest after);
  the same for columns. `size` may be left out for crop (the smallest size found) and pad (the largest).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from prefetchd.errors import ConfigError, CorruptObjectError, DatasetError, ErrorCode

MAX_SIDE = 16384          # pixels; a field larger than this is not a microscope field


class FitMode(enum.StrEnum):
    CROP = "crop"
    PAD = "pad"
    CROP_OR_PAD = "crop_or_pad"


SHAPE_KEYS = ("size", "mode")


@dataclass(frozen=True)
class ShapeOption:
    """The attach option `shape`: make every field `size` (None: decided from the sizes found) by `mode`."""

    mode: FitMode
    size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": str(self.mode), "size": list(self.size) if self.size else None}


def parse_shape(value: Any) -> ShapeOption | None:
    """`shape` as given to attach: null/false (fields must all be one size), or {size: [H, W], mode: …}."""
    if value is None or value is False:
        return None
    if isinstance(value, ShapeOption):
        return value
    accepted = f"{{size: [H, W], mode: {' | '.join(FitMode)}}}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"shape must be null or a mapping {accepted}, got {value!r}")
    unknown = sorted(set(value) - set(SHAPE_KEYS))
    if unknown:
        raise ConfigError(f"unknown shape option(s) {unknown}; accepted: {', '.join(SHAPE_KEYS)}")
    try:
        mode = FitMode(value.get("mode", FitMode.CROP_OR_PAD))
    except ValueError:
        raise ConfigError(f"shape.mode must be one of {', '.join(FitMode)}, got {value.get('mode')!r}") from None
    size = value.get("size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in size)):
            raise ConfigError(f"shape.size must be [height, width] in pixels (integers 1..{MAX_SIDE}), got {size!r}")
        size = (int(size[0]), int(size[1]))
    elif mode is FitMode.CROP_OR_PAD:
        raise ConfigError("shape.mode crop_or_pad needs shape.size: [height, width]")
    return ShapeOption(mode, size)


# ---- deciding the job's shape ---------------------------------------------------------------------------

def _text(shape: tuple[int, int]) -> str:
    return f"{shape[0]}×{shape[1]}"


@dataclass
class GroupSample:
    """What the sampled fields of one source showed."""

    name: str                                     # "source_4" ("" when the keys do not say)
    nominal: tuple[int, int] | None = None        # from the index (jump_sources), None when unknown
    shapes: collections.Counter = field(default_factory=collections.Counter)   # field shape → sampled fields

    def add(self, plane_shapes: Iterable[tuple[int, int]]) -> None:
        """One sampled field: the (height, width) of each of its channels."""
        planes = collections.Counter(plane_shapes)
        self.shapes[planes.most_common(1)[0][0]] += 1

    @property
    def shape(self) -> tuple[int, int] | None:
        """The majority among the samples (ties: the nominal shape, then the larger); nominal if none read."""
        if not self.shapes:
            return self.nominal
        top = max(self.shapes.values())
        tied = [s for s, n in self.shapes.items() if n == top]
        if self.nominal in tied:
            return self.nominal
        return max(tied, key=lambda s: (s[0] * s[1], s))

    def describe(self) -> str:
        shape = self.shape
        what = _text(shape) if shape else "unknown"
        sampled = sum(self.shapes.values())
        how = f"{sampled} sampled" if sampled else "nominal"
        odd = [f"{n}× {_text(s)}" for s, n in self.shapes.items() if s != shape]
        return f"{self.name or 'fields'} {what} ({how}{'; also ' + ', '.join(odd) if odd else ''})"


@dataclass(frozen=True)
class ShapeDecision:
    size: tuple[int, int]                 # (H, W) of every slot
    option: ShapeOption | None            # how fields of another size are made this size (None: quarantined)
    groups: tuple[str, ...]               # per source, what was found (for the log and status)


# What to change when a source's fields cannot be made shape.size in this mode.
UNFIT_FIX = {FitMode.CROP: "lower shape.size or use mode 'pad' or 'crop_or_pad'",
             FitMode.PAD: "raise shape.size or use mode 'crop' or 'crop_or_pad'"}


def decide_shape(groups: list[GroupSample], option: ShapeOption | None) -> ShapeDecision:
    """The (H, W) of the job's slots, or a one-line error naming the sizes found per source."""
    found = {g.name: g.shape for g in groups if g.shape is not None}
    if not found:
        raise DatasetError("could not read the size of any sampled field: run `prefetchd check DATASET`")
    sizes = sorted(set(found.values()))
    described = tuple(g.describe() for g in groups if g.shape is not None)
    if option is None:
        if len(sizes) > 1:
            smallest = (min(s[0] for s in sizes), min(s[1] for s in sizes))
            raise DatasetError(
                f"the selected fields are not one size: {_per_source(found)}; attach with "
                f"shape={{'size': [{smallest[0]}, {smallest[1]}], 'mode': 'crop'}} (or mode 'pad' / "
                "'crop_or_pad') to make every field one size, or select one size with source=",
                code=ErrorCode.MIXED_SHAPES)
        return ShapeDecision(sizes[0], None, described)
    size = option.size
    if size is None:
        pick = min if option.mode is FitMode.CROP else max
        size = (pick(s[0] for s in sizes), pick(s[1] for s in sizes))
    unfit = {n: s for n, s in found.items() if misfit(s, size, option)}   # crop: smaller; pad: larger
    if unfit:
        raise DatasetError(f"shape.mode {option.mode} cannot make {_text(size)} fields of {_per_source(unfit)}: "
                           f"{UNFIT_FIX[option.mode]}", code=ErrorCode.MIXED_SHAPES)
    return ShapeDecision(size, option, described)


def _per_source(found: Mapping[str, tuple[int, int]]) -> str:
    by_size: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for name, shape in found.items():
        by_size[shape].append(name or "fields")
    return ", ".join(f"{', '.join(names)} {_text(shape)}" for shape, names in sorted(by_size.items()))


# ---- making a plane the job's size ------------------------------------------------------------------------

def misfit(shape: tuple[int, ...], target: tuple[int, ...], option: ShapeOption | None) -> str | None:
    """Why a plane of `shape` cannot be made `target` under `option` (None: it can)."""
    if tuple(shape) == tuple(target):
        return None
    if option is None:
        return (f"image is {_text(shape)}, the dataset's fields are {_text(target)} "
                "(attach with shape= to crop or pad them)")
    if option.mode is FitMode.CROP and (shape[0] < target[0] or shape[1] < target[1]):
        return f"image is {_text(shape)}, smaller than shape.size {_text(target)} in crop mode"
    if option.mode is FitMode.PAD and (shape[0] > target[0] or shape[1] > target[1]):
        return f"image is {_text(shape)}, larger than shape.size {_text(target)} in pad mode"
    return None


def fit_plane(image: np.ndarray, out: np.ndarray, option: ShapeOption | None, name: str = "image") -> None:
    """Write `image` into `out` (the slot's plane), centre-cropped and/or reflect-padded as `option` allows."""
    why = misfit(image.shape, out.shape, option)
    if why:
        raise CorruptObjectError(f"{name}: {why}")
    h, w = image.shape
    H, W = out.shape
    top, left = max(0, (h - H) // 2), max(0, (w - W) // 2)
    cropped = image[top:top + min(h, H), left:left + min(w, W)]
    ch, cw = cropped.shape
    if (ch, cw) == (H, W):
        out[...] = cropped
        return
    before_h, before_w = (H - ch) // 2, (W - cw) // 2
    out[...] = np.pad(cropped, ((before_h, H - ch - before_h), (before_w, W - cw - before_w)), mode="reflect")
