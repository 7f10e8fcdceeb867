"""A blocking control-socket connection: one JSON request, one JSON reply."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from prefetchd.config import resolve_socket
from prefetchd.errors import DaemonNotRunning
from prefetchd.protocol import MAX_LINE, encode, error_from_reply


class ControlConnection:
    def __init__(self, path: str | os.PathLike | None = None, timeout: float | None = None):
        self.path = resolve_socket(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonNotRunning(
                f"no prefetchd daemon is listening on {self.path}: start one with `prefetchd serve` "
                "(or `systemctl start prefetchd`), or point --socket / PREFETCHD_SOCKET at the right one"
            ) from None
        except PermissionError:
            self.sock.close()
            raise DaemonNotRunning(f"permission denied on {self.path}: join the daemon's group "
                                   "(shm.group) or run as its user") from None
        self._file = self.sock.makefile("rb")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        try:
            self.sock.sendall(encode({"op": op, **fields}))
            line = self._file.readline(MAX_LINE * 16)
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:
            raise DaemonNotRunning(f"the daemon at {self.path} closed the connection (stopped or restarted)")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise error_from_reply(reply)
        return reply

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "ControlConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(op: str, socket_path: str | Path | None = None, timeout: float | None = 10.0, **fields: Any) -> dict:
    with ControlConnection(socket_path, timeout=timeout) as conn:
        return conn.request(op, **fields)
