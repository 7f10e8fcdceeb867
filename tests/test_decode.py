"""TIFF decoding: uncompressed Phenix-style planes are read in place; everything else through tifffile,
with the same pixels; broken bytes are a CorruptObjectError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from prefetchd.decode import decode_tiff, plane_layout
from prefetchd.errors import CorruptObjectError

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 65535, (67, 45), dtype=np.uint16)


def tiff_bytes(image: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, **kw)
    return buf.getvalue()


def test_an_uncompressed_little_endian_plane_is_a_view_of_the_bytes():
    data = tiff_bytes(IMAGE)
    image = decode_tiff(data)
    np.testing.assert_array_equal(image, IMAGE)
    assert not image.flags.writeable and np.shares_memory(image, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize("kw", [dict(byteorder=">"), dict(compression="zlib"), dict(rowsperstrip=7),
                                dict(tile=(16, 16)), dict(predictor=True, compression="zlib")],
                         ids=["big-endian", "zlib", "strips", "tiles", "predictor"])
def test_other_layouts_decode_to_the_same_pixels(kw):
    np.testing.assert_array_equal(decode_tiff(tiff_bytes(IMAGE, **kw)), IMAGE)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.float32])
def test_planes_that_are_not_uint16_are_refused_with_the_reason(dtype):
    plane = RNG.integers(0, 255, (8, 9)).astype(dtype)
    with pytest.raises(CorruptObjectError, match=f"x.tiff: pixels are {np.dtype(dtype).name}, expected uint16"):
        decode_tiff(tiff_bytes(plane), name="x.tiff")


@pytest.mark.parametrize("cut", [8, 100, 3000])
def test_truncated_bytes_are_a_corrupt_object(cut):
    with pytest.raises(CorruptObjectError, match="not a readable TIFF|expected"):
        decode_tiff(tiff_bytes(IMAGE)[:cut], name="x.tiff")


@pytest.mark.parametrize("kw", [dict(), dict(rowsperstrip=7), dict(description="x" * 5000),
                                dict(metadata=None), dict(extratags=[(65000, "s", 0, "y" * 900, False)])],
                         ids=["plain", "contiguous-strips", "long-description", "no-metadata", "private-tag"])
def test_the_hand_read_layout_of_a_plain_plane_is_where_tifffile_finds_the_pixels(kw):
    """`plane_layout` places a GET's pixels straight into a slot: it must point exactly at them."""
    data = tiff_bytes(IMAGE, **kw)
    offset, height, width = plane_layout(data[:65536], len(data))
    assert (height, width) == IMAGE.shape
    pixels = np.frombuffer(data, "<u2", count=IMAGE.size, offset=offset).reshape(IMAGE.shape)
    np.testing.assert_array_equal(pixels, IMAGE)


@pytest.mark.parametrize("image,kw", [
    (IMAGE, dict(byteorder=">")), (IMAGE, dict(compression="zlib")), (IMAGE, dict(tile=(16, 16))),
    (IMAGE, dict(predictor=True, compression="zlib")), (IMAGE, dict(bigtiff=True)),
    (IMAGE.astype(np.int16), dict()), (IMAGE.astype(np.uint8), dict()), (np.stack([IMAGE, IMAGE]), dict()),
    (np.dstack([IMAGE] * 3), dict(photometric="rgb")), (IMAGE.astype(np.float32), dict())],
    ids=["big-endian", "zlib", "tiles", "predictor", "bigtiff", "int16", "uint8", "two-pages", "rgb", "float"])
def test_anything_but_one_plain_uint16_plane_is_left_to_tifffile(image, kw):
    data = tiff_bytes(image, **kw)
    assert plane_layout(data, len(data)) is None


def test_a_layout_that_reaches_past_the_object_is_not_trusted():
    data = tiff_bytes(IMAGE)
    assert plane_layout(data, len(data) - 2) is None
    assert plane_layout(data[:6], len(data)) is None
