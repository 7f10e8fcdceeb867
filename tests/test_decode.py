"""TIFF decoding: uncompressed Phenix-style planes are read in place; everything else through tifffile,
with the same pixels; broken bytes are a CorruptObjectError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from prefetchd.decode import decode_tiff
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
