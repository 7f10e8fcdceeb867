"""CLAHE for 16-bit images with a configurable number of bins, and the robust percentile rescale.

Semantics (docs/clahe.md): OpenCV's tiling, padding (BORDER_REFLECT_101 to a multiple of the grid when the
size is not one), clip limit `max(1, int(clip_limit * tile_area / bins))`, excess redistribution (with the
residual step) and bilinear interpolation between tile mappings; bins centred at `b * 65535 / (bins - 1)`,
a pixel counts in the bin of its nearest centre and maps by linear interpolation between the mappings of
the two neighbouring centres. `bins=65536` is OpenCV's uint16 CLAHE bit for bit.

Implementations, all giving the same pixels:
- `clahe(...)`: the native kernel (`_clahe.c`, called through ctypes, GIL released, `threads` workers);
  falls back to `clahe_numpy` when the extension is not built.
- `clahe_numpy(...)`: vectorised numpy, the reference.
- `prefetchd.preprocess.clahe_torch.clahe_torch(...)`: torch, CPU or CUDA tensors, batched.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np

MAX_BINS = 65536
NATIVE_ABI = 3       # prefetchd_clahe_abi() of the matching _clahe.c (function signatures)


# ----------------------------------------------------------------------------------------------- geometry

class Geometry(NamedTuple):
    height: int
    width: int
    tiles_x: int
    tiles_y: int
    pad_bottom: int
    pad_right: int
    tile_h: int
    tile_w: int
    clip: int              # clip limit in counts per bin
    lut_scale: float       # float32(65535 / tile_area)


def tile_counts(tile_grid) -> tuple[int, int]:
    """`tile_grid` as (tiles_x, tiles_y): an int, or a (columns, rows) pair like OpenCV's tileGridSize."""
    if isinstance(tile_grid, (tuple, list)):
        tx, ty = (int(v) for v in tile_grid)
    else:
        tx = ty = int(tile_grid)
    return tx, ty


def geometry(height: int, width: int, clip_limit: float, tile_grid, bins: int) -> Geometry:
    """OpenCV's CLAHE tiling: pads only when a side is not a multiple of the grid, and then pads BOTH sides
    by `tiles - size % tiles` (a side that was a multiple gets one whole extra tile row/column)."""
    tx, ty = tile_counts(tile_grid)
    if height % ty == 0 and width % tx == 0:
        pb = pr = 0
    else:
        pb = ty - height % ty
        pr = tx - width % tx
    th = (height + pb) // ty
    tw = (width + pr) // tx
    area = th * tw
    clip = max(int(clip_limit * float(area) / bins), 1) if clip_limit > 0 else 0
    return Geometry(height, width, tx, ty, pb, pr, th, tw, clip, float(np.float32(65535.0 / area)))


def preblend(width: int, tiles_x: int, bins: int) -> bool:
    """Whether the kernels blend the two tile rows once per image row (same rule as `_clahe.c`)."""
    return bins != MAX_BINS and tiles_x * bins <= 4 * width


def pad_for_tiles(image: np.ndarray, g: Geometry) -> np.ndarray:
    if g.pad_bottom == 0 and g.pad_right == 0:
        return image
    return cv2.copyMakeBorder(image, 0, g.pad_bottom, 0, g.pad_right, cv2.BORDER_REFLECT_101)


# Bounds on what one attach may ask the decode workers to do (`check_params(bounded=True)`). A clip limit at or above `bins` already means
# "no clipping", so 65536 loses nothing; the tables of one image hold tile_grid² × bins entries.
MAX_CLIP_LIMIT = 65536.0
MAX_TILE_GRID = 64
MAX_TABLE_ENTRIES = 1 << 24      # 64 tiles² × 4096 bins, 16 tiles² × 65536 bins


def check_params(clip_limit: float, tile_grid, bins: int, *, error: type[Exception] = ValueError,
                 prefix: str = "", bounded: bool = False) -> None:
    """The one check of CLAHE's parameters, for the kernels (ValueError) and the config (`error`, `prefix`
    "clahe."). `bounded` (what a client may ask for) also caps the work per image, so that no request can
    make the decode workers allocate or loop without limit; the kernels themselves take any size."""
    if not 2 <= int(bins) <= MAX_BINS:
        raise error(f"{prefix}bins must be an integer in [2, {MAX_BINS}], got {bins}")
    tx, ty = tile_counts(tile_grid)
    if tx < 1 or ty < 1:
        raise error(f"{prefix}tile_grid must be an integer >= 1, got {tile_grid}")
    if not clip_limit > 0:
        raise error(f"{prefix}clip_limit must be > 0, got {clip_limit:g}")
    if not bounded:
        return
    if tx > MAX_TILE_GRID or ty > MAX_TILE_GRID:
        raise error(f"{prefix}tile_grid must be an integer >= 1 and <= {MAX_TILE_GRID} (tiles per side; 8 is "
                    f"usual), got {tile_grid}")
    if clip_limit > MAX_CLIP_LIMIT:
        raise error(f"{prefix}clip_limit must be > 0 and <= {MAX_CLIP_LIMIT:g} (at or above bins it no longer "
                    f"limits anything; ours defaults to 3, OpenCV's to 40), got {clip_limit:g}")
    if tx * ty * int(bins) > MAX_TABLE_ENTRIES:
        raise error(f"{prefix}tile_grid² × {prefix}bins must be at most {MAX_TABLE_ENTRIES} table entries per "
                    f"image, got {tile_grid}² × {bins}: lower tile_grid (at most "
                    f"{math.isqrt(MAX_TABLE_ENTRIES // int(bins))} with {bins} bins) or bins")


def check_args(image: np.ndarray, clip_limit: float, tile_grid, bins: int) -> None:
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"CLAHE needs a uint16 [H, W] image, got {image.dtype} {image.shape}")
    check_params(clip_limit, tile_grid, bins)


# ----------------------------------------------------------------------------------------------- numpy

def clahe_luts_numpy(padded: np.ndarray, g: Geometry, bins: int) -> np.ndarray:
    """uint16 [tiles_y * tiles_x, bins] tables (rows in tile raster order)."""
    T = g.tiles_x * g.tiles_y
    tiles = padded.reshape(g.tiles_y, g.tile_h, g.tiles_x, g.tile_w).transpose(0, 2, 1, 3).reshape(T, -1)
    if bins == MAX_BINS:
        b = tiles.astype(np.int64)
    else:
        b = (tiles.astype(np.int64) * (bins - 1) + 32767) // 65535
    b += (np.arange(T, dtype=np.int64) * bins)[:, None]
    hist = np.bincount(b.ravel(), minlength=T * bins).reshape(T, bins).astype(np.int64)
    if g.clip > 0:
        excess = np.maximum(hist - g.clip, 0).sum(axis=1)
        np.minimum(hist, g.clip, out=hist)
        redist = excess // bins
        residual = excess - redist * bins
        hist += redist[:, None]
        step = np.maximum(bins // np.maximum(residual, 1), 1)
        idx = np.arange(bins, dtype=np.int64)[None, :]
        hist += ((residual[:, None] > 0) & (idx % step[:, None] == 0) & (idx // step[:, None] < residual[:, None]))
    cdf = np.cumsum(hist, axis=1).astype(np.float32)
    lut = np.rint(cdf * np.float32(g.lut_scale))
    return np.clip(lut, 0, 65535).astype(np.uint16)


def interp_weights(n: int, tile: int, tiles: int):
    """OpenCV's float32 arithmetic: t = i * (1/tile) - 0.5; lower tile floor(t), weight t - floor(t)."""
    inv = np.float32(1.0) / np.float32(tile)
    t = np.arange(n, dtype=np.float32) * inv - np.float32(0.5)
    t1 = np.floor(t)
    w = (t - t1).astype(np.float32)
    w1 = (np.float32(1.0) - w).astype(np.float32)
    i1 = np.maximum(t1.astype(np.int64), 0)
    i2 = np.minimum(t1.astype(np.int64) + 1, tiles - 1)
    return i1, i2, w, w1


def clahe_numpy(image: np.ndarray, clip_limit: float = 3.0, tile_grid=8, bins: int = 256) -> np.ndarray:
    """Vectorised numpy CLAHE: the reference implementation (same pixels as the native kernel)."""
    check_args(image, clip_limit, tile_grid, bins)
    bins = int(bins)
    H, W = image.shape
    g = geometry(H, W, clip_limit, tile_grid, bins)
    lut = clahe_luts_numpy(pad_for_tiles(image, g), g, bins).astype(np.float32)
    diff = np.zeros_like(lut)
    diff[:, :-1] = lut[:, 1:] - lut[:, :-1]
    num = image.astype(np.int64) * (bins - 1)
    b0 = num // 65535
    f = (num - b0 * 65535).astype(np.float32) * (np.float32(1.0) / np.float32(65535.0))
    xi1, xi2, xa, xa1 = interp_weights(W, g.tile_w, g.tiles_x)
    yi1, yi2, ya, ya1 = interp_weights(H, g.tile_h, g.tiles_y)

    if preblend(W, g.tiles_x, bins):
        # blend the two tile rows per image row, then two lookups per pixel (the native kernel's order)
        lv = lut.reshape(g.tiles_y, g.tiles_x * bins)
        ld = diff.reshape(g.tiles_y, g.tiles_x * bins)
        rv = lv[yi1] * ya1[:, None] + lv[yi2] * ya[:, None]          # [H, tiles_x * bins]
        rd = ld[yi1] * ya1[:, None] + ld[yi2] * ya[:, None]
        rows = (np.arange(H, dtype=np.int64) * (g.tiles_x * bins))[:, None]

        def m(xi):
            k = rows + (xi * bins)[None, :] + b0
            return rv.ravel()[k] + f * rd.ravel()[k]

        res = m(xi1) * xa1 + m(xi2) * xa
    else:
        def m(yi, xi):
            t = (yi * g.tiles_x)[:, None] + xi[None, :]
            k = t * bins + b0
            return lut.ravel()[k] + f * diff.ravel()[k]

        res = (m(yi1, xi1) * xa1 + m(yi1, xi2) * xa) * ya1[:, None] + \
            (m(yi2, xi1) * xa1 + m(yi2, xi2) * xa) * ya[:, None]
    return np.clip(np.rint(res), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------------- native

_lib = None
_lib_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def bind_native(path: str) -> ctypes.CDLL:
    """Load a build of `_clahe.c` and declare its functions; ImportError when it is a stale build (its
    prefetchd_clahe_abi() is not NATIVE_ABI: an exported signature changed since it was built)."""
    lib = ctypes.CDLL(path)
    lib.prefetchd_clahe_abi.restype = ctypes.c_int
    abi = lib.prefetchd_clahe_abi()
    if abi != NATIVE_ABI:
        raise ImportError(f"{path} is a stale build of _clahe.c (ABI {abi}, expected {NATIVE_ABI}); "
                          f"rebuild it: pip install -e .")
    P, I, F, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_ssize_t
    lib.prefetchd_clahe_luts.argtypes = [P, S, I, I, I, I, I, I, I, F, P, P, P]
    lib.prefetchd_clahe_luts.restype = None
    lib.prefetchd_clahe_interp.argtypes = [P, S, P, S, I, I, I, I, I, I, I, I, P, P]
    lib.prefetchd_clahe_interp.restype = I
    lib.prefetchd_lut_u16.argtypes = [P, S, P, S, I, I, I, P]
    lib.prefetchd_lut_u16.restype = None
    lib.prefetchd_illum_u16.argtypes = [P, S, P, S, P, S, I, I, I, P]
    lib.prefetchd_illum_u16.restype = None
    lib.prefetchd_rescale_table.argtypes = [P, ctypes.c_double, ctypes.c_double, P, P]
    lib.prefetchd_rescale_table.restype = None
    lib.prefetchd_hist_u16.argtypes = [P, S, I, I, I, P]
    lib.prefetchd_hist_u16.restype = None
    lib.prefetchd_clahe_tile_minmax.argtypes = [P, S, I, I, I, I, I, P, P]
    lib.prefetchd_clahe_tile_minmax.restype = None
    lib.prefetchd_clahe_u16_ranges.argtypes = [I, I, I, I, I, I, P, P, P, P, P]
    lib.prefetchd_clahe_u16_ranges.restype = ctypes.c_int64
    lib.prefetchd_clahe_luts_u16.argtypes = [P, S, I, I, I, I, I, I, F, P, P, P, P, P, P]
    lib.prefetchd_clahe_luts_u16.restype = I
    lib.prefetchd_clahe_interp_u16.argtypes = [P, S, P, S, I, I, I, I, I, I, I, P, P, ctypes.c_int64, P, P]
    lib.prefetchd_clahe_interp_u16.restype = I
    return lib


def _load_native():
    global _lib
    if _lib is not None:
        return _lib or None
    with _lib_lock:
        if _lib is not None:
            return _lib or None
        lib = False
        if os.environ.get("PREFETCHD_CLAHE_NATIVE", "1") != "0":
            spec = importlib.util.find_spec("prefetchd.preprocess._clahe")
            if spec is not None and spec.origin and spec.origin.endswith((".so", ".pyd", ".dylib")):
                try:
                    lib = bind_native(spec.origin)
                except ImportError as e:
                    warnings.warn(f"{e}; using the numpy implementation", RuntimeWarning, stacklevel=2)
                    lib = False
                except (OSError, AttributeError):
                    lib = False
        _lib = lib
    return _lib or None


def native_available() -> bool:
    return _load_native() is not None


def backend() -> str:
    return "native" if native_available() else "numpy"


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lib_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="prefetchd-clahe")
    return _pool


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts) if edges[i] < edges[i + 1]]


def _run(fn, ranges, threads):
    if threads <= 1 or len(ranges) <= 1:
        for a, b in ranges:
            fn(a, b)
        return
    for fut in [_executor().submit(fn, a, b) for a, b in ranges]:
        fut.result()


def _rows_ok(a: np.ndarray) -> bool:
    return a.dtype == np.uint16 and a.ndim == 2 and a.strides[1] == 2 and a.strides[0] % 2 == 0


def clahe(image: np.ndarray, clip_limit: float = 3.0, tile_grid=8, bins: int = 256,
          out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """CLAHE of a uint16 [H, W] image into `out` (allocated when None). `threads` splits the work; the
    result does not depend on it. Uses the native kernel, or numpy when it is not built."""
    check_args(image, clip_limit, tile_grid, bins)
    bins = int(bins)
    lib = _load_native()
    if lib is None:
        res = clahe_numpy(image, clip_limit, tile_grid, bins)
        if out is None:
            return res
        out[...] = res
        return out
    H, W = image.shape
    if out is None:
        out = np.empty((H, W), np.uint16)
    target = out if _rows_ok(out) and not np.shares_memory(out, image) else np.empty((H, W), np.uint16)
    src = image if _rows_ok(image) else np.ascontiguousarray(image)
    g = geometry(H, W, clip_limit, tile_grid, bins)
    padded = pad_for_tiles(src, g)
    if not _rows_ok(padded):
        padded = np.ascontiguousarray(padded)
    T = g.tiles_x * g.tiles_y
    threads = max(1, int(threads))
    if bins == MAX_BINS:
        _clahe_u16_native(lib, src, padded, target, g, threads)
        if target is not out:
            out[...] = target
        return out
    lut16 = np.empty((T, bins), np.uint16)
    lutf = None if bins == MAX_BINS else np.empty((T, bins, 2), np.float32)
    lutf_ptr = None if lutf is None else lutf.ctypes.data

    def luts(t0, t1):
        hist = np.empty(4 * bins, np.int32)
        lib.prefetchd_clahe_luts(padded.ctypes.data, padded.strides[0] // 2, g.tile_h, g.tile_w, g.tiles_x,
                                 t0, t1, bins, g.clip, g.lut_scale, hist.ctypes.data, lut16.ctypes.data, lutf_ptr)

    _run(luts, _split(T, threads), threads)

    def interp(y0, y1):
        rc = lib.prefetchd_clahe_interp(src.ctypes.data, src.strides[0] // 2, target.ctypes.data,
                                        target.strides[0] // 2, y0, y1, W, g.tile_h, g.tile_w, g.tiles_x,
                                        g.tiles_y, bins, lut16.ctypes.data, lutf_ptr)
        if rc != 0:
            raise MemoryError("CLAHE kernel could not allocate its column tables")

    _run(interp, _split(H, threads), threads)
    if target is not out:
        out[...] = target
    return out


def _clahe_u16_native(lib, src: np.ndarray, padded: np.ndarray, target: np.ndarray, g: Geometry,
                      threads: int) -> None:
    """bins=65536 (OpenCV's uint16 CLAHE) with tables built and stored only over the values the interpolation
    reads: per tile, [min, max] of the tiles holding the pixels that read it (closed-form cdf, `_clahe.c`)."""
    H, W = src.shape
    T = g.tiles_x * g.tiles_y
    mins = np.empty(T, np.int32)
    maxs = np.empty(T, np.int32)
    lo = np.empty(T, np.int32)
    hi = np.empty(T, np.int32)
    base = np.empty(T, np.int64)
    pstride = padded.strides[0] // 2

    def minmax(t0, t1):
        lib.prefetchd_clahe_tile_minmax(padded.ctypes.data, pstride, g.tile_h, g.tile_w, g.tiles_x, t0, t1,
                                        mins.ctypes.data, maxs.ctypes.data)

    tiles = _split(T, threads)
    _run(minmax, tiles, threads)
    total = lib.prefetchd_clahe_u16_ranges(H, W, g.tile_h, g.tile_w, g.tiles_x, g.tiles_y, mins.ctypes.data,
                                           maxs.ctypes.data, lo.ctypes.data, hi.ctypes.data, base.ctypes.data)
    if total < 0:
        raise MemoryError("CLAHE kernel could not allocate its column tables")
    lut = np.empty(total + 8, np.uint16)        # + 8: the gathers read 32 bits at the last entry

    def luts(t0, t1):
        if lib.prefetchd_clahe_luts_u16(padded.ctypes.data, pstride, g.tile_h, g.tile_w, g.tiles_x, t0, t1,
                                        g.clip, g.lut_scale, mins.ctypes.data, maxs.ctypes.data, lo.ctypes.data,
                                        hi.ctypes.data, base.ctypes.data, lut.ctypes.data) != 0:
            raise MemoryError("CLAHE kernel could not allocate its histograms")

    _run(luts, tiles, threads)

    def interp(y0, y1):
        if lib.prefetchd_clahe_interp_u16(src.ctypes.data, src.strides[0] // 2, target.ctypes.data,
                                          target.strides[0] // 2, y0, y1, W, g.tile_h, g.tile_w, g.tiles_x,
                                          g.tiles_y, lut.ctypes.data, base.ctypes.data, total, mins.ctypes.data,
                                          maxs.ctypes.data) != 0:
            raise MemoryError("CLAHE kernel could not allocate its column tables")

    _run(interp, _split(H, threads), threads)


# ----------------------------------------------------------------------------------------------- rescale

def illum_divide(image: np.ndarray, illum: np.ndarray, out: np.ndarray | None = None,
                 hist: np.ndarray | None = None) -> np.ndarray:
    """`image / illum` in float32, rounded half to even and clipped to uint16 (`illum` > 0 and finite, as
    `decode.decode_npy` checks): one native pass, or numpy's five. `hist` (int64 [65536]): the result's
    histogram is added to it (what `rescale` reads next), in the same pass."""
    if out is None:
        out = np.empty(image.shape, np.uint16)
    lib = _load_native()
    if (lib is not None and image.ndim == 2 and image.dtype == np.uint16 and illum.dtype == np.float32
            and illum.shape == image.shape and out.shape == image.shape and out.dtype == np.uint16
            and _rows_ok(image) and _rows_ok(out) and illum.strides[1] == 4 and illum.strides[0] % 4 == 0
            and (hist is None or _hist_ok(hist))):
        lib.prefetchd_illum_u16(image.ctypes.data, image.strides[0] // 2, illum.ctypes.data, illum.strides[0] // 4,
                                out.ctypes.data, out.strides[0] // 2, 0, image.shape[0], image.shape[1],
                                None if hist is None else hist.ctypes.data)
        return out
    corrected = image.astype(np.float32) / illum.astype(np.float32, copy=False)
    np.rint(corrected, out=corrected)
    np.clip(corrected, 0, 65535, out=corrected)
    out[...] = corrected
    if hist is not None:
        hist += histogram_u16(out)
    return out


def _hist_ok(hist: np.ndarray) -> bool:
    return hist.dtype == np.int64 and hist.shape == (65536,) and hist.flags.c_contiguous and hist.flags.writeable


def histogram_u16(image: np.ndarray) -> np.ndarray:
    """65,536-bin histogram (int64) of a uint16 image."""
    lib = _load_native()
    if lib is None or image.ndim != 2:
        return np.bincount(image.ravel(), minlength=65536).astype(np.int64)
    src = image if _rows_ok(image) else np.ascontiguousarray(image)
    hist = np.zeros(65536, np.int64)
    lib.prefetchd_hist_u16(src.ctypes.data, src.strides[0] // 2, 0, src.shape[0], src.shape[1], hist.ctypes.data)
    return hist


def percentiles_from_hist(hist: np.ndarray, qs) -> list[float]:
    """Percentiles (0-100) with numpy's default 'linear' definition, read from a value histogram."""
    cdf = np.cumsum(hist)
    n = int(cdf[-1])
    if n == 0:
        return [0.0 for _ in qs]
    res = []
    for q in qs:
        rank = float(q) / 100.0 * (n - 1)
        k0 = int(math.floor(rank))
        frac = rank - k0
        v0 = int(np.searchsorted(cdf, k0, side="right"))
        v1 = int(np.searchsorted(cdf, min(k0 + 1, n - 1), side="right"))
        res.append(v0 + frac * (v1 - v0))
    return res


def rescale_lut(lo: float, hi: float) -> np.ndarray:
    """uint16 table v -> round(clip((v - lo) * 65535 / (hi - lo), 0, 65535)) in float32. A flat channel
    (hi - lo < 1) uses a span of 1."""
    span = np.float32(max(hi - lo, 1.0))
    v = np.arange(65536, dtype=np.float32)
    r = (v - np.float32(lo)) * (np.float32(65535.0) / span)
    np.rint(r, out=r)
    np.clip(r, 0, 65535, out=r)
    return r.astype(np.uint16)


def rescale_table(hist: np.ndarray, low: float, high: float) -> np.ndarray:
    """The rescale's uint16 table from a channel's histogram: `rescale_lut` of its [low, high] percentiles
    (one native pass over the 65,536 bins, bit for bit the same)."""
    lib = _load_native()
    if lib is None or not _hist_ok(hist):
        return rescale_lut(*percentiles_from_hist(hist, (low, high)))
    lut = np.empty(65536, np.uint16)
    bounds = np.empty(2, np.float64)
    lib.prefetchd_rescale_table(hist.ctypes.data, float(low), float(high), lut.ctypes.data, bounds.ctypes.data)
    return lut


def rescale(image: np.ndarray, low: float = 0.1, high: float = 99.9, out: np.ndarray | None = None,
            hist: np.ndarray | None = None) -> np.ndarray:
    """Map the channel's [low, high] percentiles to [0, 65535] (float32, round, clip). `hist`: the image's
    histogram when the caller has it already (`illum_divide` makes it in passing)."""
    if image.dtype != np.uint16:
        raise ValueError(f"rescale needs a uint16 image, got {image.dtype}")
    lut = rescale_table(histogram_u16(image) if hist is None else hist, low, high)
    if out is None:
        out = np.empty(image.shape, np.uint16)
    lib = _load_native()
    if lib is not None and image.ndim == 2 and _rows_ok(image) and _rows_ok(out):
        lib.prefetchd_lut_u16(image.ctypes.data, image.strides[0] // 2, out.ctypes.data, out.strides[0] // 2,
                              0, image.shape[0], image.shape[1], lut.ctypes.data)
    else:
        np.take(lut, image, out=out)
    return out
