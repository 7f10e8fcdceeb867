"""The daemon's end of the control socket: bind it only when no other daemon answers there, with the
permissions that decide who may attach (0600, or 0660 and the `shm.group` group)."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from pathlib import Path
from typing import Awaitable, Callable

from prefetchd.errors import DaemonBusy
from prefetchd.protocol import MAX_LINE

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def bind_control_socket(path: Path, handler: Handler, group: str | None = None) -> asyncio.AbstractServer:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if group else 0o700)
    if path.exists() or path.is_symlink():
        if socket_answers(path):
            raise DaemonBusy(f"another prefetchd is already listening on {path}; "
                             "stop it with `prefetchd stop` or use --socket")
        path.unlink()
    server = await asyncio.start_unix_server(handler, path=str(path), limit=MAX_LINE)
    os.chmod(path, 0o660 if group else 0o600)
    if group:
        gid = grp.getgrnam(group).gr_gid
        if os.stat(path).st_gid != gid:  # skip the syscall when it is a no-op (SystemCallFilter=~@privileged)
            os.chown(path, -1, gid)
    return server


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
