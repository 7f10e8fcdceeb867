"""The client's zero-copy batch: scattered arena slots mapped side by side into one address range.

A batch's fields sit in arbitrary slots. Rather than copying them into a contiguous buffer, we reserve
`max_batch` slot strides of address space once and map each slot of the batch at its position with
MAP_FIXED, so `images` is one strided `uint16 [B, C, H, W]` array over the daemon's pages. A position
that already shows the right slot is not remapped. Linux only (as is the daemon).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np

from prefetchd.errors import ShmError
from prefetchd.shm.arena import SHM_DIR, ArenaLayout

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, offset)
    if out is None or out == _MAP_FAILED:
        err = ctypes.get_errno()
        raise ShmError(f"mmap of {length} bytes failed: {os.strerror(err)}")
    return out


class _Reservation:
    """An address range that outlives the view while numpy arrays still point into it."""

    def __init__(self, length: int):
        self.length = length
        self.addr = _mmap(None, length, _PROT_NONE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        self.buffer = (ctypes.c_char * length).from_address(self.addr)
        weakref.finalize(self.buffer, _libc.munmap, self.addr, length)


class BatchView:
    """Maps batches of slots of one arena, read-only, for one client."""

    def __init__(self, layout: ArenaLayout, max_batch: int):
        self.layout = layout
        self.max_batch = max_batch
        try:
            self._fd = os.open(SHM_DIR / layout.name, os.O_RDONLY)
        except FileNotFoundError:
            raise ShmError(f"shared memory segment {layout.name} is gone: the daemon stopped or "
                           "reaped the job; attach again") from None
        except PermissionError:
            raise ShmError(f"no permission to read /dev/shm/{layout.name}: run the trainer as the "
                           "daemon's user or set shm.group in the daemon config") from None
        self._reservation = _Reservation(layout.slot_stride * max_batch)
        self._mapped: list[int | None] = [None] * max_batch

    def images(self, slots: list[int]) -> np.ndarray:
        if len(slots) > self.max_batch:
            raise ValueError(f"batch of {len(slots)} exceeds the view's {self.max_batch}")
        stride = self.layout.slot_stride
        for pos, slot in enumerate(slots):
            if self._mapped[pos] != slot:
                _mmap(self._reservation.addr + pos * stride, stride, mmap.PROT_READ,
                      mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE, self._fd,
                      self.layout.data_offset + slot * stride)
                self._mapped[pos] = slot
        c, h, w = self.layout.shape
        item = np.dtype(self.layout.dtype).itemsize
        arr = np.ndarray((len(slots), c, h, w), dtype=self.layout.dtype, buffer=self._reservation.buffer,
                         strides=(stride, h * w * item, w * item, item))
        arr.flags.writeable = False
        return arr

    def close(self) -> None:
        """Release the segment. Arrays handed out earlier now read zeros instead of crashing."""
        if self._fd is None:
            return
        r = self._reservation
        _mmap(r.addr, r.length, mmap.PROT_READ, mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
        self._mapped = [None] * self.max_batch
        os.close(self._fd)
        self._fd = None
