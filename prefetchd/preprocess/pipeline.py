"""Preprocessing options and the per-channel pipeline (spine version: illum + OpenCV CLAHE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from prefetchd.errors import ConfigError


@dataclass(frozen=True)
class ClaheOptions:
    clip_limit: float = 3.0
    tile_grid: int = 8
    bins: int = 65536


@dataclass(frozen=True)
class Preprocessing:
    illum: bool = True
    rescale: Any = False                 # False or (low, high) percentiles
    clahe: ClaheOptions | None = ClaheOptions()

    @classmethod
    def from_options(cls, illum: Any = True, rescale: Any = False, clahe: Any = None) -> "Preprocessing":
        if not isinstance(illum, bool):
            raise ConfigError(f"illum must be true or false, got {illum!r}")
        clahe_opts = None
        if clahe not in (False, None):
            if clahe is True:
                clahe = {}
            if not isinstance(clahe, dict):
                raise ConfigError(f"clahe must be false or a mapping {{clip_limit, tile_grid, bins}}, got {clahe!r}")
            unknown = set(clahe) - {"clip_limit", "tile_grid", "bins"}
            if unknown:
                raise ConfigError(f"unknown clahe option(s) {sorted(unknown)}; accepted: clip_limit, tile_grid, bins")
            clahe_opts = ClaheOptions(**clahe)
            if clahe_opts.clip_limit <= 0:
                raise ConfigError(f"clahe.clip_limit must be > 0, got {clahe_opts.clip_limit}")
            if clahe_opts.tile_grid < 1:
                raise ConfigError(f"clahe.tile_grid must be >= 1, got {clahe_opts.tile_grid}")
            if clahe_opts.bins != 65536:
                raise ConfigError("clahe.bins other than 65536 is not implemented yet")
        if rescale not in (False, None):
            raise ConfigError("rescale is not implemented yet; use rescale: false")
        return cls(illum=illum, rescale=False, clahe=clahe_opts)

    def to_dict(self) -> dict:
        return {
            "illum": self.illum,
            "rescale": self.rescale,
            "clahe": False if self.clahe is None else dict(vars(self.clahe)),
        }


def illum_correct(image: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """`orig / illum` in float32, rounded and clipped to uint16."""
    corrected = image.astype(np.float32) / illum.astype(np.float32, copy=False)
    np.rint(corrected, out=corrected)
    np.clip(corrected, 0, 65535, out=corrected)
    return corrected.astype(np.uint16)


def apply_channel(image: np.ndarray, illum: np.ndarray | None, opts: Preprocessing, out: np.ndarray) -> None:
    """Run the pipeline on one uint16 [H, W] channel and write the result into `out`."""
    if opts.illum and illum is not None:
        image = illum_correct(image, illum)
    if opts.clahe is not None:
        clahe = cv2.createCLAHE(clipLimit=opts.clahe.clip_limit,
                                tileGridSize=(opts.clahe.tile_grid, opts.clahe.tile_grid))
        image = clahe.apply(image)
    out[...] = image
