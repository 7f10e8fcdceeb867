"""Benchmarks and figures: `python -m bench.clahe`, `python -m bench.clahe_figure`."""

from __future__ import annotations

import numpy as np


def cell_like_channel(size: int = 1080, seed: int = 0, peak: int = 7000) -> np.ndarray:
    """A cell-like uint16 channel (~13 bits used). Uses `prefetchd.dev.synth` (the DNA channel of a demo
    field) when it is available, else a small generator of blurred nuclei on a noisy background."""
    try:
        from prefetchd.dev import synth

        spec = synth.demo_spec(fields=8, size=size, seed=seed)
        plate = spec.plates[0] if hasattr(spec, "plates") else None
        if plate is not None:
            well = spec.wells[0] if getattr(spec, "wells", None) else "A01"
            chans = tuple(getattr(spec, "channels", ()) or (5,))
            channel = 5 if 5 in chans else chans[0]          # DNA (Phenix ch5)
            img = synth.render_channel(spec, plate, well, 1, channel)
            if img.dtype == np.uint16 and img.shape == (size, size) and img.max() > 255:
                return img
    except Exception:  # synth missing or changed: fall back to the local generator
        pass
    return _fallback_channel(size, seed, peak)


def _fallback_channel(size: int, seed: int, peak: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    n = max(8, size * size // 9000)
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    for y, x in zip(ys, xs):
        ax = int(rng.integers(size // 120 + 2, size // 60 + 4))
        cv2.ellipse(img, (int(x), int(y)), (ax, int(ax * rng.uniform(0.6, 1.0))), float(rng.uniform(0, 180)),
                    0, 360, float(rng.uniform(0.3, 1.0)), -1)
    img = cv2.GaussianBlur(img, (0, 0), size / 400 + 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    vignette = 1.0 - 0.35 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 4
    img = (300 + img * peak) * vignette + rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 65535).astype(np.uint16)
