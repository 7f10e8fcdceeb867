"""Preprocessing options and the per-channel pipeline: illumination correction, robust rescale, CLAHE.

Order per channel: decode (uint16) -> `orig / illum` (float32, round, clip) -> robust rescale of the
[low, high] percentiles to [0, 65535] -> CLAHE with `bins` (docs/clahe.md). With `clahe.where: trainer`
the daemon stops after the rescale and the trainer runs `clahe_torch` on its device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prefetchd.errors import ConfigError
from prefetchd.preprocess.clahe import check_params
from prefetchd.preprocess.clahe import clahe as _clahe_cpu
from prefetchd.preprocess.clahe import illum_divide as _illum_divide
from prefetchd.preprocess.clahe import rescale as _rescale

WHERE = ("daemon", "trainer")
CLAHE_KEYS = ("clip_limit", "tile_grid", "bins", "where")
RESCALE_KEYS = ("low", "high")


@dataclass(frozen=True)
class ClaheOptions:
    clip_limit: float = 3.0
    tile_grid: int = 8
    bins: int = 256
    where: str = "daemon"           # daemon | trainer


@dataclass(frozen=True)
class RescaleOptions:
    low: float = 0.1                # percentiles, 0 <= low < high <= 100
    high: float = 99.9


DEFAULT_RESCALE = RescaleOptions()
DEFAULT_CLAHE = ClaheOptions()
_UNSET: Any = object()


def _number(name: str, value: Any, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number {accepted}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise ConfigError(f"{name} must be an integer {accepted}, got {value!r}")
    return int(value)


def parse_clahe(clahe: Any) -> ClaheOptions | None:
    if clahe is False or clahe is None:
        return None
    if clahe is True:
        clahe = {}
    if isinstance(clahe, ClaheOptions):
        clahe = asdict(clahe)
    if not isinstance(clahe, dict):
        raise ConfigError(f"clahe must be false or a mapping {{clip_limit, tile_grid, bins, where}}, got {clahe!r}")
    unknown = sorted(set(clahe) - set(CLAHE_KEYS))
    if unknown:
        raise ConfigError(f"unknown clahe option(s) {unknown}; accepted: {', '.join(CLAHE_KEYS)}")
    clip = _number("clahe.clip_limit", clahe.get("clip_limit", DEFAULT_CLAHE.clip_limit), "> 0")
    tiles = _integer("clahe.tile_grid", clahe.get("tile_grid", DEFAULT_CLAHE.tile_grid), ">= 1")
    bins = _integer("clahe.bins", clahe.get("bins", DEFAULT_CLAHE.bins), "in [2, 65536]")
    check_params(clip, tiles, bins, error=ConfigError, prefix="clahe.", bounded=True)
    where = clahe.get("where", DEFAULT_CLAHE.where)
    if where not in WHERE:
        raise ConfigError(f"clahe.where must be one of {', '.join(WHERE)}, got {where!r}")
    return ClaheOptions(clip_limit=clip, tile_grid=tiles, bins=bins, where=where)


def parse_rescale(rescale: Any) -> RescaleOptions | None:
    if rescale is False or rescale is None:
        return None
    if rescale is True:
        rescale = {}
    if isinstance(rescale, RescaleOptions):
        rescale = asdict(rescale)
    if isinstance(rescale, (tuple, list)) and len(rescale) == 2:
        rescale = {"low": rescale[0], "high": rescale[1]}
    if not isinstance(rescale, dict):
        raise ConfigError(f"rescale must be false or a mapping {{low, high}} of percentiles, got {rescale!r}")
    unknown = sorted(set(rescale) - set(RESCALE_KEYS))
    if unknown:
        raise ConfigError(f"unknown rescale option(s) {unknown}; accepted: {', '.join(RESCALE_KEYS)}")
    low = _number("rescale.low", rescale.get("low", DEFAULT_RESCALE.low), "in [0, 100)")
    high = _number("rescale.high", rescale.get("high", DEFAULT_RESCALE.high), "in (0, 100]")
    if not 0 <= low < 100:
        raise ConfigError(f"rescale.low must be a percentile in [0, 100) below rescale.high, got {low:g}")
    if not 0 < high <= 100:
        raise ConfigError(f"rescale.high must be a percentile in (0, 100] above rescale.low, got {high:g}")
    if low >= high:
        raise ConfigError(f"rescale.low must be < rescale.high (percentiles in [0, 100]), got low={low:g} high={high:g}")
    return RescaleOptions(low=low, high=high)


@dataclass(frozen=True)
class Preprocessing:
    illum: bool = True
    rescale: RescaleOptions | None = DEFAULT_RESCALE
    clahe: ClaheOptions | None = DEFAULT_CLAHE

    @classmethod
    def from_options(cls, illum: Any = True, rescale: Any = _UNSET, clahe: Any = _UNSET) -> "Preprocessing":
        """Validate user options. `rescale`/`clahe`: false or null = off, true = defaults, a mapping =
        defaults overridden; not given = the defaults (rescale 0.1/99.9, CLAHE 3.0, 8, 256 bins)."""
        if not isinstance(illum, bool):
            raise ConfigError(f"illum must be true or false, got {illum!r}")
        return cls(illum=illum,
                   rescale=DEFAULT_RESCALE if rescale is _UNSET else parse_rescale(rescale),
                   clahe=DEFAULT_CLAHE if clahe is _UNSET else parse_clahe(clahe))

    @classmethod
    def opencv_compatible(cls, illum: bool = True, clip_limit: float = 3.0, tile_grid: int = 8) -> "Preprocessing":
        """The spine's behaviour: no rescale, OpenCV uint16 CLAHE (65,536 bins)."""
        return cls.from_options(illum=illum, rescale=False,
                                clahe={"clip_limit": clip_limit, "tile_grid": tile_grid, "bins": 65536})

    @property
    def daemon_clahe(self) -> ClaheOptions | None:
        """The CLAHE the daemon applies (None when off or left to the trainer)."""
        return self.clahe if self.clahe is not None and self.clahe.where == "daemon" else None

    @property
    def trainer_clahe(self) -> ClaheOptions | None:
        """The CLAHE the trainer applies with `clahe_torch` (None unless `clahe.where: trainer`)."""
        return self.clahe if self.clahe is not None and self.clahe.where == "trainer" else None

    def to_dict(self) -> dict:
        return {
            "illum": self.illum,
            "rescale": False if self.rescale is None else asdict(self.rescale),
            "clahe": False if self.clahe is None else asdict(self.clahe),
        }


def illum_correct(image: np.ndarray, illum: np.ndarray, hist: np.ndarray | None = None) -> np.ndarray:
    """`orig / illum` in float32, rounded (half to even) and clipped to uint16; `hist` gets its histogram."""
    return _illum_divide(image, illum, hist=hist)


def apply_channel(image: np.ndarray, illum: np.ndarray | None, opts: Preprocessing, out: np.ndarray,
                  threads: int = 1) -> None:
    """Run the pipeline on one uint16 [H, W] channel and write the result into `out`.

    `threads` > 1 splits the CLAHE over that many threads (same pixels); the daemon's decode pool already
    runs one channel per thread, so it keeps the default 1.
    """
    hist = None
    if opts.illum and illum is not None:
        hist = np.zeros(65536, np.int64) if opts.rescale is not None else None   # the rescale's, in passing
        image = illum_correct(image, illum, hist)
    cl = opts.daemon_clahe
    if opts.rescale is not None:
        target = np.empty(image.shape, np.uint16) if cl is not None else out
        if target.dtype != np.uint16:
            target = np.empty(image.shape, np.uint16)
        image = _rescale(image, opts.rescale.low, opts.rescale.high, out=target, hist=hist)
    if cl is not None:
        if out.dtype == np.uint16 and out.shape == image.shape:
            _clahe_cpu(image, cl.clip_limit, cl.tile_grid, cl.bins, out=out, threads=threads)
            return
        image = _clahe_cpu(image, cl.clip_limit, cl.tile_grid, cl.bins, threads=threads)
    if image is not out:
        out[...] = image
