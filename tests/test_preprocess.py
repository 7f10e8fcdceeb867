"""Preprocessing options, illumination correction, robust rescale, the per-channel pipeline."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from prefetchd.errors import ConfigError
from prefetchd.preprocess import Preprocessing, apply_channel, illum_correct
from prefetchd.preprocess import clahe as C


def test_defaults():
    d = Preprocessing.from_options().to_dict()
    assert d == {"illum": True, "rescale": {"low": 0.1, "high": 99.9},
                 "clahe": {"clip_limit": 3.0, "tile_grid": 8, "bins": 256, "where": "daemon"}}
    assert Preprocessing.from_options(rescale=True, clahe=True).to_dict() == d
    off = Preprocessing.from_options(illum=False, rescale=False, clahe=False).to_dict()
    assert off == {"illum": False, "rescale": False, "clahe": False}
    p = Preprocessing.from_options(clahe={"bins": 65536, "where": "trainer"}, rescale={"low": 1})
    assert p.clahe.bins == 65536 and p.clahe.clip_limit == 3.0 and p.trainer_clahe and not p.daemon_clahe
    assert p.rescale.low == 1 and p.rescale.high == 99.9


def test_default_config_uses_new_defaults():
    import yaml
    from pathlib import Path

    import prefetchd

    cfg = yaml.safe_load((Path(prefetchd.__file__).parent / "default_config.yaml").read_text())["defaults"]
    p = Preprocessing.from_options(illum=cfg["illum"], rescale=cfg["rescale"], clahe=cfg["clahe"])
    assert p == Preprocessing.from_options()


@pytest.mark.parametrize("opts, words", [
    (dict(clahe={"bins": 1}), ["clahe.bins", "[2, 65536]"]),
    (dict(clahe={"bins": 65537}), ["clahe.bins", "[2, 65536]"]),
    (dict(clahe={"tile_grid": 0}), ["clahe.tile_grid", ">= 1"]),
    (dict(clahe={"clip_limit": 0}), ["clahe.clip_limit", "> 0"]),
    (dict(clahe={"clip_limit": -1.5}), ["clahe.clip_limit", "> 0"]),
    (dict(clahe={"where": "gpu"}), ["clahe.where", "daemon, trainer"]),
    (dict(clahe={"tiles": 8}), ["unknown clahe option", "clip_limit, tile_grid, bins, where"]),
    (dict(rescale={"low": 50, "high": 50}), ["rescale.low", "rescale.high"]),
    (dict(rescale={"low": 60, "high": 40}), ["rescale.low", "rescale.high"]),
    (dict(rescale={"high": 101}), ["rescale.high", "100"]),
    (dict(rescale={"lo": 1}), ["unknown rescale option", "low, high"]),
    (dict(rescale="yes"), ["rescale"]),
    (dict(illum="yes"), ["illum"]),
])
def test_bad_options_one_clear_line(opts, words):
    with pytest.raises(ConfigError) as e:
        Preprocessing.from_options(**opts)
    msg = e.value.message
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_illum_correct_rounds_and_clips():
    img = np.array([[10, 11, 65535, 5, 0]], np.uint16)
    illum = np.array([[4.0, 2.0, 0.5, 2.0, 0.1]], np.float32)
    assert illum_correct(img, illum).tolist() == [[2, 6, 65535, 2, 0]]   # 2.5 -> 2, 5.5 -> 6 (half to even)
    assert illum_correct(img, illum).dtype == np.uint16


def numpy_illum(image: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """The definition: float32 `orig / illum`, round half to even, clip, uint16."""
    q = image.astype(np.float32) / illum.astype(np.float32)
    return np.clip(np.rint(q), 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("shape", [(1080, 1080), (7, 13), (1, 5), (33, 1)])
def test_the_native_illumination_pass_equals_the_numpy_definition(shape):
    """One native pass (SSE2, 8 pixels at a time, a scalar tail) instead of numpy's five: every pixel the same,
    halves rounded to even, quotients past 65535 clipped, rows of a wider illumination array (a view) too."""
    assert C.native_available()
    rng = np.random.default_rng(3)
    img = rng.integers(0, 65536, shape, dtype=np.uint16)
    illum = (rng.random(shape) * 2 + 1e-3).astype(np.float32)
    np.testing.assert_array_equal(C.illum_divide(img, illum), numpy_illum(img, illum))
    ramp = (np.arange(img.size) % 65536).astype(np.uint16).reshape(shape)
    for value in (2.0, 4.0, 0.5, 0.25, 0.999, 3.0, 1e-30, 3e38):    # exact halves, overflow, underflow
        flat = np.full(shape, value, np.float32)
        np.testing.assert_array_equal(C.illum_divide(ramp, flat), numpy_illum(ramp, flat), err_msg=str(value))
    wide = (rng.random((shape[0], shape[1] + 9)) + 0.5).astype(np.float32)[:, 3 : 3 + shape[1]]
    np.testing.assert_array_equal(C.illum_divide(img, wide), numpy_illum(img, wide))


def test_the_native_rescale_table_equals_percentiles_then_lut():
    """`rescale_table` (one native pass over the histogram) is `percentiles_from_hist` + `rescale_lut` bit for
    bit: random, skewed, flat (span < 1) and narrow channels, default and odd percentiles."""
    assert C.native_available()
    rng = np.random.default_rng(11)
    for trial in range(100):
        shape = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
        img = [rng.integers(0, 65536, shape), rng.gamma(2, 300, shape), np.full(shape, int(rng.integers(0, 65536))),
               rng.integers(100, 103, shape), (rng.random(shape) ** 8) * 65535][trial % 5].astype(np.uint16)
        hist = C.histogram_u16(img)
        for low, high in [(0.1, 99.9), (0.0, 100.0), (float(rng.random() * 50), float(50 + rng.random() * 50))]:
            expected = C.rescale_lut(*C.percentiles_from_hist(hist, (low, high)))
            np.testing.assert_array_equal(C.rescale_table(hist, low, high), expected, err_msg=f"{trial} {low} {high}")
    hist = np.zeros(65536, np.int64)
    corrected = C.illum_divide(img, np.full(img.shape, 0.7, np.float32), hist=hist)   # the histogram in passing
    np.testing.assert_array_equal(hist, C.histogram_u16(corrected))


def test_rescale_percentiles_match_numpy():
    rng = np.random.default_rng(5)
    for img in [rng.integers(100, 7000, (301, 257)).astype(np.uint16), rng.gamma(2, 300, (64, 64)).astype(np.uint16)]:
        for low, high in [(0.1, 99.9), (0, 100), (2, 98)]:
            lo, hi = C.percentiles_from_hist(C.histogram_u16(img), (low, high))
            assert lo == pytest.approx(np.percentile(img, low), abs=1e-6)
            assert hi == pytest.approx(np.percentile(img, high), abs=1e-6)
            out = C.rescale(img, low, high)
            expect = np.clip(np.rint((img.astype(np.float32) - np.float32(lo)) * (np.float32(65535) / np.float32(hi - lo))), 0, 65535)
            assert np.array_equal(out, expect.astype(np.uint16))
            assert out.min() == 0 and out.max() == 65535


def test_rescale_flat_channel():
    assert not C.rescale(np.full((10, 10), 700, np.uint16)).any()


def test_apply_channel_pipeline_and_out_view():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 8000, (2, 96, 80)).astype(np.uint16)
    illum = rng.uniform(0.5, 2.0, (96, 80)).astype(np.float32)
    slot = np.zeros((3, 96, 80), np.uint16)
    p = Preprocessing.from_options()
    apply_channel(img[0], illum, p, slot[1])
    expect = C.clahe(C.rescale(illum_correct(img[0], illum)), 3.0, 8, 256)
    assert np.array_equal(slot[1], expect) and not slot[0].any() and not slot[2].any()
    # compatible mode = the spine: illum + OpenCV uint16 CLAHE
    compat = Preprocessing.opencv_compatible()
    out = np.empty((96, 80), np.uint16)
    apply_channel(img[1], illum, compat, out)
    assert np.array_equal(out, cv2.createCLAHE(3.0, (8, 8)).apply(illum_correct(img[1], illum)))
    # where: trainer -> the daemon ships illum-corrected, rescaled uint16
    tr = Preprocessing.from_options(clahe={"where": "trainer"})
    apply_channel(img[1], illum, tr, out)
    assert np.array_equal(out, C.rescale(illum_correct(img[1], illum)))
    # everything off
    apply_channel(img[1], None, Preprocessing.from_options(rescale=False, clahe=False), out)
    assert np.array_equal(out, img[1])
