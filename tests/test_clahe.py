"""CLAHE with bins: OpenCV compatibility, 8-bit equivalence, precision, torch, properties."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import cell_like_channel
from prefetchd.preprocess import clahe as C

SIZES = [(37, 53), (129, 257), (100, 64), (16, 17), (5, 3), (1, 1), (211, 97)]


def cv_clahe(img, clip=3.0, grid=8):
    tx, ty = C.tile_counts(grid)
    return cv2.createCLAHE(clip, (tx, ty)).apply(img)


@pytest.fixture(scope="module")
def cell():
    return cell_like_channel(360, seed=3)


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("grid", [8, 3, (4, 2)])
def test_compatible_mode_equals_opencv_uint16_random(shape, grid):
    rng = np.random.default_rng(hash((shape, str(grid))) % 2**32)
    img = rng.integers(0, 8000, shape).astype(np.uint16)
    ref = cv_clahe(img, 3.0, grid)
    assert np.array_equal(C.clahe(img, 3.0, grid, 65536), ref)
    assert np.array_equal(C.clahe_numpy(img, 3.0, grid, 65536), ref)


@pytest.mark.parametrize("crop", [(360, 360), (359, 301), (123, 77)])
@pytest.mark.parametrize("clip", [3.0, 40.0, 0.5])
def test_compatible_mode_equals_opencv_uint16_cell_like(cell, crop, clip):
    img = np.ascontiguousarray(cell[: crop[0], : crop[1]])
    assert np.array_equal(C.clahe(img, clip, 8, 65536), cv_clahe(img, clip))
    assert np.array_equal(C.clahe(img, clip, 8, 65536, threads=2), cv_clahe(img, clip))


def test_full_size_compatible_and_threads():
    img = cell_like_channel(1080)
    assert np.array_equal(C.clahe(img, 3.0, 8, 65536), cv_clahe(img))
    one = C.clahe(img, 3.0, 8, 256, threads=1)
    assert np.array_equal(one, C.clahe(img, 3.0, 8, 256, threads=2))
    assert np.array_equal(one, C.clahe(img, 3.0, 8, 256, threads=7))


@pytest.mark.parametrize("shape", [(1080, 1080), (37, 53), (129, 257), (7, 5)])
def test_256_bins_equals_opencv_8bit_times_257(shape):
    rng = np.random.default_rng(7)
    levels = rng.integers(0, 256, shape).astype(np.uint8)
    ref = cv_clahe(levels).astype(np.int64) * 257
    ours = C.clahe(levels.astype(np.uint16) * 257, 3.0, 8, 256).astype(np.int64)
    assert np.abs(ours - ref).max() <= 257


def test_native_equals_numpy_reference(cell):
    rng = np.random.default_rng(11)
    for img, bins, grid in [(cell, 256, 8), (cell[:101, :203].copy(), 1000, 5), (rng.integers(0, 65536, (64, 80)).astype(np.uint16), 2, 3),
                            (cell[:50, :400].copy(), 4096, 8)]:
        assert np.array_equal(C.clahe(img, 2.0, grid, bins), C.clahe_numpy(img, 2.0, grid, bins))


def test_monotone_within_a_tile(cell):
    img = cell[:256, :256].copy()
    g = C.geometry(256, 256, 3.0, 8, 256)
    # one tile's inner core (pixels whose four interpolation weights are the same tile) maps monotonically
    y0, x0 = g.tile_h * 2 + g.tile_h // 2, g.tile_w * 2 + g.tile_w // 2
    ramp = np.tile(np.linspace(0, 65535, 65536 // 64, dtype=np.float64).astype(np.uint16), (256, 1))[:, :256]
    base = img.copy()
    out_vals = []
    for v in np.linspace(0, 65535, 300).astype(np.uint16):
        base[y0, x0] = v
        out_vals.append(int(C.clahe(base, 3.0, 8, 256)[y0, x0]))
    assert all(b >= a for a, b in zip(out_vals, out_vals[1:]))
    assert ramp.dtype == np.uint16


def test_precision_ramp_keeps_many_more_levels():
    ramp = np.tile(np.arange(0, 65536, 4, dtype=np.uint32)[None, :2048], (256, 1)).astype(np.uint16) * 2
    ours = C.clahe(ramp, 3.0, 8, 256)
    eight = cv_clahe((ramp >> 8).astype(np.uint8))
    assert len(np.unique(ours)) >= 10 * len(np.unique(eight))


def test_uint16_opencv_squeezes_while_ours_uses_the_range(cell):
    assert C.clahe(C.rescale(cell), 3.0, 8, 256).mean() > 1.5 * cv_clahe(cell).mean()


def test_torch_cpu_equals_cpu_kernel(cell):
    torch = pytest.importorskip("torch")
    from prefetchd.preprocess.clahe_torch import clahe_torch

    for img, bins, grid in [(cell, 256, 8), (cell[:101, :203].copy(), 65536, 8), (cell[:33, :47].copy(), 1000, (3, 2))]:
        t = clahe_torch(torch.from_numpy(img.astype(np.int32)).to(torch.uint16), 3.0, grid, bins)
        assert t.dtype == torch.uint16
        assert np.abs(t.to(torch.int32).numpy() - C.clahe(img, 3.0, grid, bins).astype(np.int64)).max() <= 1
    batch = np.stack([cell[:64, :64], cell[64:128, :64]])
    tb = clahe_torch(torch.from_numpy(batch.astype(np.float32)), 3.0, 8, 256)
    for i in range(2):
        assert np.abs(tb[i].numpy() - C.clahe(batch[i].copy(), 3.0, 8, 256)).max() <= 1


def test_torch_cuda_equals_cpu_kernel(cell):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from prefetchd.preprocess.clahe_torch import clahe_torch

    t = clahe_torch(torch.from_numpy(cell.astype(np.int32)).to(torch.uint16).cuda(), 3.0, 8, 256)
    assert np.abs(t.cpu().to(torch.int32).numpy() - C.clahe(cell, 3.0, 8, 256).astype(np.int64)).max() <= 1


@pytest.mark.parametrize("bad, msg", [(dict(bins=1), "bins"), (dict(bins=65537), "bins"), (dict(tile_grid=0), "tile_grid"),
                                      (dict(clip_limit=0.0), "clip_limit")])
def test_bad_arguments(bad, msg):
    args = dict(clip_limit=3.0, tile_grid=8, bins=256) | bad
    with pytest.raises(ValueError, match=msg):
        C.clahe(np.zeros((8, 8), np.uint16), **args)


images = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["random", "constant", "zero", "saturated", "low"]),
                   st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images, st.integers(1, 9), st.sampled_from([2, 3, 16, 256, 1000, 65536]), st.sampled_from([0.5, 1.0, 3.0, 40.0]))
def test_properties(spec, grid, bins, clip):
    h, w, kind, seed = spec
    rng = np.random.default_rng(seed)
    img = {"random": lambda: rng.integers(0, 65536, (h, w)),
           "constant": lambda: np.full((h, w), int(rng.integers(0, 65536))),
           "zero": lambda: np.zeros((h, w)),
           "saturated": lambda: np.full((h, w), 65535),
           "low": lambda: rng.integers(0, 300, (h, w))}[kind]().astype(np.uint16)
    ours = C.clahe(img, clip, grid, bins)
    assert ours.shape == img.shape and ours.dtype == np.uint16
    assert np.array_equal(ours, C.clahe_numpy(img, clip, grid, bins))
    assert np.array_equal(ours, C.clahe(img, clip, grid, bins, threads=3))
    if bins == 65536:
        assert np.array_equal(ours, cv_clahe(img, clip, grid))
    if kind in ("constant", "zero", "saturated"):
        assert len(np.unique(ours)) <= 4 * grid * grid   # one value per tile mix, never noise
