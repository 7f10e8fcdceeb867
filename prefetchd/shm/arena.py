"""The arena: one shared-memory segment per job, which is also that job's cache.

Layout (all little endian, offsets page aligned):
    [0, 4096)             header (HEADER_DTYPE)
    [4096, data_offset)   slot table: one SLOT_DTYPE row per slot
    [data_offset, ...)    slot data, one field (uint16 [C, H, W]) per slot, each slot 4 KiB aligned

Only the daemon creates, writes and unlinks arenas. Segments live in /dev/shm as `prefetchd-<job>`.
"""

from __future__ import annotations

import enum
import hashlib
import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefetchd.errors import ShmError

SHM_DIR = Path("/dev/shm")
PREFIX = "prefetchd-"
MAGIC = b"PFDARENA"
LAYOUT_VERSION = 1
PAGE = 4096
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14

HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("version", "<u4"),
    ("owner_pid", "<u4"),
    ("slot_count", "<u8"),
    ("slot_bytes", "<u8"),
    ("slot_stride", "<u8"),
    ("data_offset", "<u8"),
    ("dtype", "S8"),
    ("shape", "<u4", (3,)),
])
SLOT_DTYPE = np.dtype([("state", "<u4"), ("leases", "<u4"), ("field", "<i8"), ("generation", "<u8")])


class SlotState(enum.IntEnum):
    FREE = 0      # holds nothing useful
    FILLING = 1   # a fetch/decode is writing into it
    READY = 2     # holds `field`, evictable unless still needed by a prefetch window
    LEASED = 3    # handed to at least one client; never evicted


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def arena_name(job: str) -> str:
    """`prefetchd-<job>`; a job id that is not kept as is (characters outside [A-Za-z0-9_.-], or longer than
    200) also gets `~` and a hash of the original, so distinct ids never share a segment (`team/run1` and
    `team_run1`). Ids kept as is never contain `~`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:200]
    if safe == job:
        return PREFIX + safe
    return f"{PREFIX}{safe}~{hashlib.sha256(job.encode()).hexdigest()[:12]}"


def list_segments() -> list[str]:
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX))


@dataclass(frozen=True)
class ArenaLayout:
    """What a client needs to map slots: sent in the attach reply."""

    name: str
    slot_count: int
    shape: tuple[int, int, int]
    dtype: str
    slot_bytes: int
    slot_stride: int
    data_offset: int

    @classmethod
    def plan(cls, name: str, slot_count: int, shape: tuple[int, int, int], dtype: str = "uint16") -> "ArenaLayout":
        slot_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        table_end = PAGE + slot_count * SLOT_DTYPE.itemsize
        return cls(name, slot_count, tuple(int(s) for s in shape), dtype, slot_bytes,
                   _align(slot_bytes), _align(table_end))

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.slot_count * self.slot_stride

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "ArenaLayout":
        return cls(**{**d, "shape": tuple(d["shape"])})


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


class Arena:
    """The daemon's handle on one arena: writable slot views and the slot table."""

    def __init__(self, layout: ArenaLayout, fd: int, mm: mmap.mmap):
        self.layout = layout
        self._fd = fd
        self._mm = mm
        buf = np.frombuffer(mm, dtype=np.uint8)
        self.header = buf[: HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[0:1]
        table_bytes = layout.slot_count * SLOT_DTYPE.itemsize
        self.table = buf[PAGE : PAGE + table_bytes].view(SLOT_DTYPE)
        self._data = buf[layout.data_offset :]
        self._closing = False
        self._prefault: threading.Thread | None = None

    @classmethod
    def create(
        cls,
        name: str,
        slot_count: int,
        shape: tuple[int, int, int],
        *,
        dtype: str = "uint16",
        mode: int = 0o600,
        gid: int | None = None,
        budget_bytes: int = 0,
    ) -> "Arena":
        layout = ArenaLayout.plan(name, slot_count, shape, dtype)
        check_fits(layout.total_bytes, budget_bytes)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise ShmError(_exists_message(path)) from None
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what the config asked for
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.ftruncate(fd, layout.total_bytes)
            mm = mmap.mmap(fd, layout.total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        arena = cls(layout, fd, mm)
        arena._write_header()
        arena._touch_pages()
        return arena

    def _write_header(self) -> None:
        h = self.header
        h["magic"] = MAGIC
        h["version"] = LAYOUT_VERSION
        h["owner_pid"] = os.getpid()
        h["slot_count"] = self.layout.slot_count
        h["slot_bytes"] = self.layout.slot_bytes
        h["slot_stride"] = self.layout.slot_stride
        h["data_offset"] = self.layout.data_offset
        h["dtype"] = self.layout.dtype.encode()
        h["shape"] = self.layout.shape
        self.table["state"] = SlotState.FREE
        self.table["field"] = -1

    def _touch_pages(self) -> None:
        """Fault every page in once, up front: first-touch faults cost 10-50x a steady copy.

        A large arena (thousands of fields, tens of GB) takes seconds to fault in, so it happens in a
        background thread with MADV_POPULATE_WRITE, which allocates pages without changing their content
        and is therefore safe while slots are already being filled. Slot order matches the free list, so
        the first slots handed out are the first populated. Kernels without it (< 5.14) fault on first write.
        """
        self._prefault = threading.Thread(target=self._populate, name=f"prefault-{self.layout.name}", daemon=True)
        self._prefault.start()

    def _populate(self) -> None:
        chunk = 64 << 20
        start, end = self.layout.data_offset, self.layout.total_bytes
        for offset in range(start, end, chunk):
            if self._closing:
                return
            try:
                self._mm.madvise(MADV_POPULATE_WRITE, offset, min(chunk, end - offset))
            except (OSError, ValueError):
                return

    def slot(self, index: int) -> np.ndarray:
        start = index * self.layout.slot_stride
        flat = self._data[start : start + self.layout.slot_bytes]
        return flat.view(self.layout.dtype).reshape(self.layout.shape)

    def set_state(self, index: int, state: SlotState, field: int | None = None) -> None:
        row = self.table[index : index + 1]
        if field is not None:
            row["field"] = field
        if state == SlotState.FILLING:
            row["generation"] += 1
        row["state"] = int(state)

    def close(self) -> None:
        self._closing = True
        if self._prefault is not None:
            self._prefault.join()
        self.header = self.table = self._data = None  # views must go before the mmap closes
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a slot view is still alive somewhere; the mapping goes when it does
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def unlink(self) -> None:
        (SHM_DIR / self.layout.name).unlink(missing_ok=True)

    def destroy(self) -> None:
        self.unlink()  # first: whatever happens next, the name must not outlive the job
        self.close()


def check_fits(total_bytes: int, budget_bytes: int = 0) -> None:
    free = shm_free_bytes()
    limit = min(free * 9 // 10, budget_bytes) if budget_bytes else free * 9 // 10
    if total_bytes > limit:
        gib = 1 << 30
        raise ShmError(
            f"the arena needs {total_bytes / gib:.2f} GiB of shared memory but only {limit / gib:.2f} GiB "
            f"may be used ({free / gib:.2f} GiB free in {SHM_DIR}"
            + (f", shm.budget_bytes={budget_bytes}" if budget_bytes else "")
            + "): lower cache_size or enlarge /dev/shm"
        )


def read_owner_pid(name: str) -> int | None:
    """The pid that created a segment, from its header; None if it is not one of our arenas."""
    try:
        with open(SHM_DIR / name, "rb") as f:
            raw = f.read(HEADER_DTYPE.itemsize)
    except OSError:
        return None
    if len(raw) < HEADER_DTYPE.itemsize:
        return None
    header = np.frombuffer(raw, HEADER_DTYPE)[0]
    if header["magic"] != MAGIC:
        return None
    return int(header["owner_pid"])


def _exists_message(path: Path) -> str:
    """What to do about a segment that is in the way: never tell the user to delete a live job's arena."""
    owner = read_owner_pid(path.name)
    if owner is not None and owner != os.getpid() and _alive(owner):
        return (f"shared memory segment {path} belongs to a job of another running prefetchd daemon (pid {owner}): "
                "attach with a different job id, or to that daemon's socket")
    if owner is not None and owner != os.getpid():
        return (f"shared memory segment {path} was left by a prefetchd daemon that is gone (pid {owner}) and "
                f"could not be reaped (another user's?): remove it with `rm {path}`")
    return (f"shared memory segment {path} already exists and is not an arena of a running daemon: "
            f"attach with a different job id, or remove it with `rm {path}` if nothing uses it")


def reap_stale_segments() -> list[str]:
    """Unlink arenas whose creating daemon is gone (a crash or SIGKILL left them behind)."""
    reaped = []
    for name in list_segments():
        pid = read_owner_pid(name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            if (SHM_DIR / name).stat().st_uid != os.getuid():
                continue
            (SHM_DIR / name).unlink()
            reaped.append(name)
        except OSError:
            pass
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
