"""A blocking control-socket connection: one JSON request, one JSON reply.

Every way the daemon can fail to answer becomes one `PrefetchdError` with a line that says what to do:
nobody listening (`DaemonNotRunning`), no answer within the timeout or a listen backlog that stays full
(`DaemonTimeout`), a connection closed or a reply cut off mid-line. A connection that timed out is
broken for good (a late reply would answer the wrong request); open a new one, as `Stream` does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefetchd.config import resolve_socket
from prefetchd.errors import DaemonNotRunning, DaemonTimeout, ProtocolError
from prefetchd.protocol import MAX_LINE, encode, error_from_reply

REPLY_LIMIT = MAX_LINE * 16        # bytes in one reply line (status of many jobs is the largest)
CONNECT_BACKOFF_S = (0.005, 0.1)   # first and largest pause between connects while the backlog is full


class ControlConnection:
    def __init__(self, path: str | os.PathLike | None = None, timeout: float | None = None):
        self.path = resolve_socket(path)
        self.timeout = timeout
        self.broken: str | None = None     # why this connection can no longer be used
        self.timed_out = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self._connect()
        except BaseException:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")

    def _connect(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pause = CONNECT_BACKOFF_S[0]
        while True:
            try:
                self.sock.connect(str(self.path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonNotRunning(
                    f"no prefetchd daemon is listening on {self.path}: start one with `prefetchd serve` "
                    "(or `systemctl start prefetchd`), or point --socket / PREFETCHD_SOCKET at the right one"
                ) from None
            except PermissionError:
                raise DaemonNotRunning(f"permission denied on {self.path}: join the daemon's group "
                                       "(shm.group) or run as its user") from None
            except BlockingIOError:
                # A unix socket whose listen backlog is full refuses a connect with a timeout at once
                # (EAGAIN): the daemon is not accepting (paused, hung, or a storm of clients). Retry.
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise DaemonTimeout(
                        f"the prefetchd daemon at {self.path} accepted no connection within {self.timeout:g} s "
                        "(its backlog is full: paused, hung or flooded with clients); check `systemctl status "
                        "prefetchd` or raise the timeout") from None
                time.sleep(pause)  # backoff between connect attempts, bounded by the deadline
                pause = min(2 * pause, CONNECT_BACKOFF_S[1])
            except TimeoutError:
                raise self._timed_out("connect") from None

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self.broken:
            raise (DaemonTimeout if self.timed_out else DaemonNotRunning)(
                f"{self.broken}; this connection cannot be used again, open a new one")
        try:
            self.sock.sendall(encode({"op": op, **fields}))
            line = self._file.readline(REPLY_LIMIT)
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        except TimeoutError:
            raise self._timed_out(op) from None
        if not line:
            self.broken = f"the daemon at {self.path} closed the connection (stopped or restarted)"
            raise DaemonNotRunning(self.broken)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no end of line")
            reply = json.loads(line)
        except ValueError:
            self.broken = f"the daemon at {self.path} sent a malformed reply to {op!r}"
            raise ProtocolError(f"{self.broken} ({len(line)} bytes); is something else listening on that "
                                "socket? check `prefetchd status --socket ...`") from None
        if not reply.get("ok"):
            raise error_from_reply(reply)
        return reply

    def _timed_out(self, op: str) -> DaemonTimeout:
        self.timed_out = True
        self.broken = f"the prefetchd daemon at {self.path} did not answer {op!r} within {self.timeout:g} s"
        return DaemonTimeout(f"{self.broken}: it is paused, hung or overloaded; check `systemctl status "
                             "prefetchd` (or that its process is not stopped), or raise the timeout")

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
