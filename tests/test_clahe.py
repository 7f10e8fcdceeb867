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
    base = img.copy()
    out_vals = []
    for v in np.linspace(0, 65535, 300).astype(np.uint16):
        base[y0, x0] = v
        out_vals.append(int(C.clahe(base, 3.0, 8, 256)[y0, x0]))
    assert all(b >= a for a, b in zip(out_vals, out_vals[1:]))
    assert out_vals[-1] > out_vals[0]  # the pixel really moved through the mapping


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


# ------------------------------------------------------------------ compatible mode (bins=65536): restricted tables
# The native kernel builds each tile's table only over the values its interpolation reads (closed-form cdf
# outside the tile's own values); these compare it with OpenCV over value ranges, layouts and geometries.

def _cv_exact(img, clip, grid):
    ref = cv_clahe(img, clip, grid)
    ours = C.clahe(img, clip, grid, 65536)
    assert np.array_equal(ours, ref)
    for threads in (2, 3):
        assert np.array_equal(C.clahe(img, clip, grid, 65536, threads=threads), ref)
    return ours


@pytest.mark.parametrize("lo, hi", [(1000, 1010), (1000, 1000), (0, 65535), (0, 8191), (65500, 65535), (0, 1),
                                    (30000, 30300)])
@pytest.mark.parametrize("grid", [8, (5, 3), 1])
@pytest.mark.parametrize("clip", [3.0, 0.5, 40.0])
def test_compatible_value_ranges(lo, hi, grid, clip):
    rng = np.random.default_rng(lo * 7 + hi)
    img = rng.integers(lo, hi + 1, (203, 157)).astype(np.uint16)
    _cv_exact(img, clip, grid)


@pytest.mark.parametrize("grid", [8, 2, 1, (3, 5)])
@pytest.mark.parametrize("clip", [3.0, 40.0, 200.0])
def test_compatible_large_tiles_redistribute(grid, clip):
    """Large tiles over narrow ranges: clip > 1 and excess >= 65536 (batch > 0) with a residual step."""
    rng = np.random.default_rng(5)
    img = (rng.integers(0, 40, (720, 600)) + 3000).astype(np.uint16)
    img[::7, ::3] = 3000          # a heavy bin
    img[100:200, 100:300] = 3100  # a flat block
    _cv_exact(img, clip, grid)


def test_compatible_neighbour_ranges_differ():
    """Tiles read at values outside their own [min, max]: neighbours hold far lower or higher values."""
    rng = np.random.default_rng(9)
    img = np.empty((400, 400), np.uint16)
    img[:, :200] = rng.integers(100, 130, (400, 200))
    img[:, 200:] = rng.integers(60000, 60010, (400, 200))
    img[150:250, 150:250] = 30000
    img[0, 0], img[-1, -1] = 0, 65535
    for grid in (8, 3, (7, 2)):
        for clip in (3.0, 0.1, 40.0):
            _cv_exact(img, clip, grid)
            _cv_exact(np.ascontiguousarray(img[:, ::-1]), clip, grid)
            _cv_exact(np.ascontiguousarray(img.T), clip, grid)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 3), (7, 64), (64, 7), (135, 136), (17, 300)])
@pytest.mark.parametrize("grid", [8, 16, (9, 2)])
def test_compatible_tiles_mostly_padding(shape, grid):
    """Sizes where whole tiles are padding (never read) or read only by neighbouring tiles' pixels."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for img in (rng.integers(0, 65536, shape), rng.integers(500, 520, shape), np.arange(np.prod(shape)).reshape(shape) * 37 % 9000):
        _cv_exact(img.astype(np.uint16), 3.0, grid)


def test_compatible_constant_and_saturated():
    for v in (0, 1, 1000, 32768, 65534, 65535):
        for shape, grid in [((64, 64), 8), ((37, 53), 8), ((300, 200), 2), ((5, 3), 4)]:
            _cv_exact(np.full(shape, v, np.uint16), 3.0, grid)


def test_compatible_strided_input_and_output(cell):
    view = cell[1:300:2, 3:350]           # non-contiguous rows and an odd offset
    ref = cv_clahe(np.ascontiguousarray(view))
    assert np.array_equal(C.clahe(view, 3.0, 8, 65536), ref)
    big = np.zeros((view.shape[0], view.shape[1] + 10), np.uint16)
    out = big[:, 5:5 + view.shape[1]]
    C.clahe(view, 3.0, 8, 65536, out=out, threads=2)
    assert np.array_equal(out, ref)
    assert not big[:, :5].any() and not big[:, 5 + view.shape[1]:].any()


def test_compatible_full_size_threads_and_ranges():
    rng = np.random.default_rng(21)
    for img in (cell_like_channel(1080), rng.integers(0, 65536, (1080, 1080)).astype(np.uint16),
                rng.integers(0, 8000, (1080, 1080)).astype(np.uint16)):
        ref = cv_clahe(img)
        for threads in (1, 2, 7):
            assert np.array_equal(C.clahe(img, 3.0, 8, 65536, threads=threads), ref)


def test_compatible_render_channel():
    """Every stain of a synthetic field (prefetchd.dev.synth.render_channel), odd size."""
    from prefetchd.dev import synth

    spec = synth.demo_spec(fields=8, size=301, seed=4)
    plate = spec.plates[0]
    well = spec.wells[0] if getattr(spec, "wells", None) else "A01"
    for channel in tuple(getattr(spec, "channels", ()) or (5,)):
        img = synth.render_channel(spec, plate, well, 1, channel)
        assert img.dtype == np.uint16
        for grid, clip in ((8, 3.0), (5, 40.0)):
            _cv_exact(np.ascontiguousarray(img[:, :277]), clip, grid)


value_ranges = st.one_of(
    st.tuples(st.integers(0, 65535), st.integers(0, 10)),          # narrow, e.g. [1000, 1010]
    st.tuples(st.integers(0, 65535), st.just(0)),                  # a single value
    st.tuples(st.integers(0, 8191), st.integers(0, 8191)),         # ~13 bits, like real data
    st.tuples(st.just(0), st.just(65535)),                         # the full range
    st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 90), st.integers(1, 90), value_ranges, st.sampled_from(["uniform", "blocks", "sparse", "ramp"]),
       st.tuples(st.integers(1, 9), st.integers(1, 9)), st.sampled_from([0.01, 0.5, 1.0, 3.0, 10.0, 40.0, 1000.0]),
       st.integers(0, 2**32 - 1))
def test_compatible_properties_over_value_ranges(h, w, vr, kind, grid, clip, seed):
    lo, width = vr
    hi = min(65535, lo + width)
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        img = rng.integers(lo, hi + 1, (h, w))
    elif kind == "blocks":        # tiles with different ranges, so neighbours are read outside their own
        img = np.full((h, w), lo)
        ys, xs = rng.integers(0, h, 3), rng.integers(0, w, 3)
        for y, x in zip(ys, xs):
            img[y: y + h // 3 + 1, x: x + w // 3 + 1] = rng.integers(lo, hi + 1)
    elif kind == "sparse":        # a flat background with a few outliers at the range ends
        img = np.full((h, w), lo)
        img.ravel()[rng.integers(0, h * w, max(1, h * w // 50))] = hi
    else:
        img = lo + (np.arange(h * w).reshape(h, w) * 131) % (hi - lo + 1)
    img = img.astype(np.uint16)
    ref = cv_clahe(img, clip, grid)
    assert np.array_equal(C.clahe(img, clip, grid, 65536), ref)
    assert np.array_equal(C.clahe(img, clip, grid, 65536, threads=3), ref)


# ------------------------------------------------------------------ compatible mode: kernel paths
# The interpolation interleaves a region's four tables (AVX2, value range <= 48 x its pixel count) or reads them
# directly (AVX2 gathers; scalar without AVX2); AVX2 runs of >= 8 pixels end with an overlapping 8-pixel step;
# tile min/max and the tables have AVX2 and scalar paths. These cover the edges of each path.

def _kinds(shape, rng):
    yield rng.integers(0, 8192, shape)                                   # ~13 bits
    full = rng.integers(0, 65536, shape)
    full.flat[0], full.flat[-1] = 0, 65535
    yield full                                                           # the full range
    yield np.full(shape, 4321)                                           # flat
    yield rng.integers(30000, 30040, shape)                              # narrow


@pytest.mark.parametrize("shape", [(1, 1080), (1080, 1), (1, 17), (17, 1), (2, 999), (1079, 1081), (257, 263),
                                   (1001, 37), (135, 1080)])
@pytest.mark.parametrize("grid", [8, (7, 3), 16, (40, 3)])
def test_compatible_odd_shapes_and_grids(shape, grid):
    """1 x N and N x 1 images, odd sizes, grids that do not divide the image, more than 16 tile columns."""
    rng = np.random.default_rng(shape[0] * 7919 + shape[1])
    for img in _kinds(shape, rng):
        _cv_exact(img.astype(np.uint16), 3.0, grid)


@pytest.mark.parametrize("tw", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33])
def test_compatible_run_lengths(tw):
    """Tile widths (and so column runs of tw / 2 and tw pixels) around the 8- and 16-wide vector steps."""
    rng = np.random.default_rng(tw)
    for grid in [(4, 3), (9, 2)]:
        img = rng.integers(1000, 1100, (60, tw * grid[0])).astype(np.uint16)
        _cv_exact(img, 3.0, grid)
        _cv_exact(np.ascontiguousarray(img[:, :-1]), 40.0, grid)         # padded: the last tile is partial


def test_compatible_interleaved_and_direct_regions():
    """One image with regions of both interpolation paths: narrow values (interleaved tables) beside
    full-range noise in small tiles (range far above the pixel count: the tables are read directly)."""
    rng = np.random.default_rng(17)
    img = rng.integers(2000, 2300, (600, 600))
    img[:, 300:] = rng.integers(0, 65536, (600, 300))
    img = img.astype(np.uint16)
    for grid in (8, 40, (60, 5)):
        _cv_exact(img, 3.0, grid)
        _cv_exact(np.ascontiguousarray(img.T), 0.5, grid)


def _build_variant(tmp_path, name, defines):
    """Compile _clahe.c with extra -D switches into tmp_path; None when no C compiler works here."""
    import subprocess
    import sysconfig
    from pathlib import Path

    src = Path(C.__file__).with_name("_clahe.c")
    out = tmp_path / f"_clahe_{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    cmd = cc + ["-shared", "-fPIC", "-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99",
                f"-I{sysconfig.get_paths()['include']}", *defines, "-o", str(out), str(src)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return C.bind_native(str(out))


@pytest.mark.parametrize("name, defines", [
    ("baseline", ["-DPREFETCHD_NO_AVX2", "-DPREFETCHD_NO_CLONES"]),     # what a CPU without AVX2 runs
    ("nogather", ["-DPREFETCHD_NO_GATHER"]),                            # scalar interpolation, AVX2 tables
    ("direct", ["-DQTABLE_RATIO=0"]),                                   # AVX2, never interleaved
])
def test_compatible_build_variants_equal_opencv(tmp_path, name, defines):
    lib = _build_variant(tmp_path, name, defines)
    if lib is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(3)
    cases = [(cell_like_channel(360, seed=5), 8, 3.0), (rng.integers(0, 65536, (203, 157)), (5, 3), 0.5),
             (rng.integers(500, 520, (1, 333)), 8, 3.0), (rng.integers(0, 8192, (129, 257)), 16, 40.0),
             (np.full((64, 64), 65535), 8, 3.0), (rng.integers(0, 65536, (300, 300)), 40, 3.0)]
    for img, grid, clip in cases:
        img = np.ascontiguousarray(img.astype(np.uint16))
        ref = cv_clahe(img, clip, grid)
        g = C.geometry(*img.shape, clip, grid, 65536)
        padded = np.ascontiguousarray(C.pad_for_tiles(img, g))
        for threads in (1, 3):
            out = np.zeros_like(img)
            C._clahe_u16_native(lib, img, padded, out, g, threads)
            assert np.array_equal(out, ref), (name, img.shape, grid, clip, threads)
