"""TIFF bytes → uint16 channels → preprocessing → one field written straight into its slot.

Runs in the decode thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import tifffile

from prefetchd.errors import CorruptObjectError
from prefetchd.field_shape import ShapeOption, fit_plane, misfit
from prefetchd.preprocess import Preprocessing, apply_channel


def decode_tiff(data: bytes, *, name: str = "object") -> np.ndarray:
    """A 2-D uint16 image, exactly as stored (never squashed to 8 bits; other pixel types are refused).
    Uncompressed little-endian planes (what the Phenix writes) come back as a read-only view of `data` (bytes
    or any buffer, e.g. obstore's `Bytes`): no copy, and found by `plane_layout` without tifffile (~0.4 ms of
    GIL-held Python per file)."""
    layout = plane_layout(data, len(data))
    if layout is not None:
        offset, height, width = layout
        return np.frombuffer(data, dtype="<u2", count=height * width, offset=offset).reshape(height, width)
    try:
        with tifffile.TiffFile(_file_over(data)) as tif:
            image = _raw_plane(tif, data)
            if image is None:
                image = tif.asarray()
    except Exception as exc:  # tifffile raises many types for broken files
        raise CorruptObjectError(f"{name}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise CorruptObjectError(f"{name}: expected one 2-D plane, got shape {image.shape}")
    if image.dtype != np.uint16:
        # An 8-bit (or float, or signed) plane is not what the microscope wrote: widening it would hand the
        # trainer 0..255 beside 16-bit planes, indistinguishable after rescale and CLAHE. Refuse it.
        raise CorruptObjectError(f"{name}: pixels are {image.dtype}, expected uint16 (the microscope's 16-bit "
                                 "planes); it was converted or exported: copy the original TIFF")
    return image


def _file_over(data) -> io.IOBase:
    """A seekable file over the body without a copy (BytesIO shares a `bytes` but copies other buffers)."""
    return io.BytesIO(data) if isinstance(data, bytes) else io.BufferedReader(_BufferFile(data))


class _BufferFile(io.RawIOBase):
    def __init__(self, data):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _raw_plane(tif: tifffile.TiffFile, data: bytes) -> np.ndarray | None:
    """The pixels of a single uncompressed, contiguous, little-endian uint16 plane, straight from the bytes."""
    page = tif.pages.first
    if not (tif.byteorder == "<" and len(tif.pages) == 1 and page.compression == 1 and page.predictor == 1
            and page.dtype == np.uint16 and page.samplesperpixel == 1 and len(page.shape) == 2 and page.is_contiguous):
        return None
    height, width = page.shape
    return np.frombuffer(data, dtype="<u2", count=height * width, offset=page.dataoffsets[0]).reshape(height, width)


_TAG = struct.Struct("<HHI4s")
_SIZES = {3: 2, 4: 4}     # SHORT, LONG: the types strip offsets and counts come in
_ONE_PLANE = {258: 16, 259: 1, 277: 1, 284: 1, 317: 1, 339: 1}   # 16 bits, uncompressed, 1 sample, chunky, no
#                                                                   predictor, unsigned (when present)


def plane_layout(head, size: int) -> tuple[int, int, int] | None:
    """(offset, height, width) of the pixels when `head` (the first bytes of a TIFF object of `size` bytes)
    holds a little-endian classic TIFF of one uncompressed uint16 plane stored in one contiguous run, with its
    IFD inside `head`; None for anything else (tifffile then reads the whole object). Reading the first IFD by
    hand is what lets a GET place the pixels straight into a slot before the rest of the body arrives."""
    view = memoryview(head).cast("B")
    n = len(view)
    if n < 8 or view[:4] != b"II*\x00":
        return None
    (ifd,) = struct.unpack_from("<I", view, 4)
    if ifd + 2 > n:
        return None
    (count,) = struct.unpack_from("<H", view, ifd)
    end = ifd + 2 + 12 * count
    if end + 4 > n or struct.unpack_from("<I", view, end)[0] != 0:    # a second page
        return None
    tags = {}
    for i in range(count):
        tag, kind, values, raw = _TAG.unpack_from(view, ifd + 2 + 12 * i)
        tags[tag] = (kind, values, raw)
    if 322 in tags or 324 in tags:                # tiled
        return None
    try:
        width, height = _scalar(tags[256]), _scalar(tags[257])
        for tag, wanted in _ONE_PLANE.items():
            if tag in tags and _scalar(tags[tag]) != wanted:
                return None
        if 258 not in tags:
            return None
        offsets, counts = _array(tags[273], view), _array(tags[279], view)
    except (KeyError, ValueError, struct.error):
        return None
    if offsets is None or counts is None or len(offsets) != len(counts) or not offsets:
        return None
    for i in range(1, len(offsets)):
        if offsets[i] != offsets[i - 1] + counts[i - 1]:
            return None
    nbytes = 2 * width * height
    if sum(counts) != nbytes or offsets[0] + nbytes > size or width < 1 or height < 1:
        return None
    return offsets[0], height, width


def _scalar(entry) -> int:
    kind, values, raw = entry
    if values != 1 or kind not in _SIZES:
        raise ValueError(kind)
    return struct.unpack_from("<H" if kind == 3 else "<I", raw)[0]


def _array(entry, view: memoryview) -> list[int] | None:
    kind, values, raw = entry
    width = _SIZES.get(kind)
    if width is None:
        return None
    fmt = f"<{values}{'H' if kind == 3 else 'I'}"
    if values * width <= 4:
        return list(struct.unpack_from(fmt, raw))
    (at,) = struct.unpack_from("<I", raw)
    if at + values * width > len(view):
        return None
    return list(struct.unpack_from(fmt, view, at))


def decode_npy(data: bytes, *, name: str = "illum") -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise CorruptObjectError(f"{name}: not a readable .npy ({exc})") from exc
    if array.ndim != 2:
        raise CorruptObjectError(f"{name}: illumination function must be 2-D, got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)) or array.min() <= 0:
        raise CorruptObjectError(f"{name}: illumination function has zero, negative or non-finite values")
    return array


def tiff_shape(data: bytes, *, name: str = "object") -> tuple[int, int]:
    """(height, width) of a TIFF's plane from its header, without decoding the pixels."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            shape = tuple(tif.pages.first.shape)
    except Exception as exc:
        raise CorruptObjectError(f"{name}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise CorruptObjectError(f"{name}: expected one 2-D plane, got shape {shape}")
    return shape


def field_plane_shapes(channel_bytes: list[bytes], names: list[str]) -> list[tuple[int, int]]:
    return [tiff_shape(data, name=name) for data, name in zip(channel_bytes, names)]


def assemble_field(
    channel_bytes: list[bytes],
    illums: list[np.ndarray | None],
    opts: Preprocessing,
    out: np.ndarray,
    names: list[str],
    fit: ShapeOption | None = None,
) -> None:
    """Decode every channel and write the preprocessed stack into `out` (uint16 [C, H, W]). A channel of
    another size is preprocessed at its own size, then centre-cropped / reflect-padded as `fit` says."""
    for c, data in enumerate(channel_bytes):
        place_channel(decode_tiff(data, name=names[c]), illums[c], opts, out[c], names[c], fit)


def place_channel(image: np.ndarray, illum: np.ndarray | None, opts: Preprocessing, out: np.ndarray, name: str,
                  fit: ShapeOption | None = None) -> None:
    """One decoded channel, preprocessed, into its plane `out` (uint16 [H, W]); a channel of another size is
    preprocessed at its own size, then centre-cropped / reflect-padded as `fit` says."""
    why = misfit(image.shape, out.shape, fit)
    if why:
        raise CorruptObjectError(f"{name}: {why}")
    if illum is not None and illum.shape != image.shape:
        raise CorruptObjectError(f"illumination function for {name} is {illum.shape}, image is {image.shape}")
    if image.shape == out.shape:
        apply_channel(image, illum, opts, out)
        return
    native = np.empty(image.shape, np.uint16)
    apply_channel(image, illum, opts, native)
    fit_plane(native, out, fit, name)
