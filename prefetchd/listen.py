"""The daemon's end of the control socket: one daemon per socket path, with the permissions that decide who may
attach (0600, or 0660 and the `shm.group` group).

The path is claimed with a lock file beside the socket (`<socket>.lock`, flock held for the daemon's life and
released by the kernel when it dies), not by whether something answers on the socket: removing the socket
file under a running daemon must not let a second one start there. The daemon remembers the inode it bound:
it recreates a socket file someone removed, leaves alone one someone else put there, and on shutdown unlinks
the path only if it is still its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Awaitable, Callable

from prefetchd.errors import DaemonBusy
from prefetchd.protocol import MAX_LINE

log = logging.getLogger("prefetchd")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class ControlSocket:
    """The socket path this daemon holds: its lock, the listening server, the inode it bound."""

    def __init__(self, path: Path, handler: Handler, group: str | None = None):
        self.path = path
        self.handler = handler
        self.group = group
        self.server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None   # (st_dev, st_ino) of the socket file we bound
        self._replaced_logged = False

    async def bind(self) -> asyncio.AbstractServer:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if self.group else 0o700)
        self._lock()
        try:
            if self.path.exists() or self.path.is_symlink():
                if socket_answers(self.path):  # not a prefetchd of this version: it would hold the lock
                    raise DaemonBusy(f"another process is listening on {self.path} (a prefetchd without a lock file, "
                                     "or another program); stop it (`prefetchd stop --socket ...`) or use --socket")
                self.path.unlink()  # left by a daemon that died: we hold the lock, so no live one owns it
            await self._listen()
        except BaseException:
            self.release()
            raise
        return self.server

    async def _listen(self) -> None:
        self.server = await asyncio.start_unix_server(self.handler, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o660 if self.group else 0o600)
        if self.group:
            gid = grp.getgrnam(self.group).gr_gid
            if os.stat(self.path).st_gid != gid:  # skip the syscall when it is a no-op (SystemCallFilter=~@privileged)
                os.chown(self.path, -1, gid)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._replaced_logged = False

    def _lock(self) -> None:
        lock = lock_path(self.path)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DaemonBusy(f"cannot open the lock file {lock} beside the socket ({exc.strerror}): it belongs to "
                             "another user or the directory is read-only; use another --socket") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonBusy(f"another prefetchd (pid {holder}) already serves {self.path} (it holds {lock}); "
                             "stop it with `prefetchd stop`, or use another --socket") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def owns_path(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def keep_bound(self) -> None:
        """Recreate the socket file if someone removed it (clients find the daemon by its path); leave a file
        someone else put there alone, and say so once."""
        if self.server is None or self.owns_path():
            return
        if self.path.exists() or self.path.is_symlink():
            if not self._replaced_logged:
                log.warning("the control socket %s was replaced by another file; leaving it alone (clients cannot "
                            "reach this daemon until it is removed)", self.path)
                self._replaced_logged = True
            return
        log.warning("the control socket %s was removed; binding it again", self.path)
        old = self.server
        await self._listen()
        old.close()  # stops listening on the unreachable inode; its connections carry on

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours; the lock stays until `release`."""
        if self.server is not None:
            self.server.close()
        if self.owns_path():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def release(self) -> None:
        """Give the path up (the lock file stays: unlinking it would let two daemons lock two inodes)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def socket_answers(path: Path) -> bool:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
