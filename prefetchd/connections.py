"""Control connections: who holds one, how many each peer may hold, and when one is over.

- `Connection`: one client connection; after `attach` it speaks for one rank of one job.
- `Admission`: caps on the connections open at once, per peer (uid) and in total, so one careless or hostile
  client cannot take every file descriptor of the daemon.
- `read_request`: the next request line; an unattached connection that sends nothing for the idle timeout is
  over (an attached rank is not: between requests it holds its batch's slots while it trains on them).
- `until_peer_leaves`: runs one request while watching the socket, so a rank whose process dies while it waits
  in `next` for a slow fill is noticed at once and its rank is free for the process that replaces it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable

from prefetchd.peercred import PeerCred
from prefetchd.protocol import MAX_LINE

if TYPE_CHECKING:
    from prefetchd.job import Job

REFUSAL_LOG_EVERY_S = 10.0   # refusals of one peer are logged at most this often (with a count)


@dataclass
class Connection:
    """One client connection; after `attach` it speaks for one rank of one job."""

    cred: PeerCred | None
    sock: socket.socket | None = None
    job: "Job | None" = None
    rank: int | None = None
    task: asyncio.Task | None = None

    @property
    def peer(self) -> str:
        return str(self.cred) if self.cred else "an unknown peer"

    @property
    def peer_key(self) -> int | None:
        return self.cred.uid if self.cred else None

    def peer_gone(self) -> bool:
        """The other end closed (or reset) the connection, even if our reader has not seen it yet."""
        if self.sock is None:
            return False
        try:  # the event loop's transport socket does not recv(): peek through a duplicate of its descriptor
            with socket.fromfd(self.sock.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as peek:
                return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


@dataclass
class Admission:
    """Connections open at once: at most `total`, and at most `per_peer` from one uid."""

    total: int
    per_peer: int
    open: collections.Counter = field(default_factory=collections.Counter)
    refused: int = 0
    _last_logged: dict[Any, float] = field(default_factory=dict)
    _unlogged: collections.Counter = field(default_factory=collections.Counter)

    @property
    def count(self) -> int:
        return sum(self.open.values())

    def admit(self, conn: Connection) -> str | None:
        """None (admitted and counted) or why not, as one line that says what to do."""
        key = conn.peer_key
        if self.count >= self.total:
            reason = (f"the daemon has {self.count} control connections open (control.max_connections="
                      f"{self.total}); close streams you no longer use, or raise control.max_connections")
        elif self.open[key] >= self.per_peer:
            reason = (f"uid {key} has {self.open[key]} control connections open (control.max_connections_per_peer="
                      f"{self.per_peer}); close streams you no longer use, or raise control.max_connections_per_peer")
        else:
            self.open[key] += 1
            return None
        self.refused += 1
        return reason

    def leave(self, conn: Connection) -> None:
        key = conn.peer_key
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]

    def should_log(self, conn: Connection) -> tuple[bool, int]:
        """Whether to log this refusal now, and how many of this peer's refusals went unlogged before it."""
        key, now = conn.peer_key, time.monotonic()
        if now - self._last_logged.get(key, -REFUSAL_LOG_EVERY_S) < REFUSAL_LOG_EVERY_S:
            self._unlogged[key] += 1
            return False, 0
        self._last_logged[key] = now
        return True, self._unlogged.pop(key, 0)


class IdleConnection(Exception):
    """An unattached connection sent no request within the idle timeout."""


async def read_request(reader: asyncio.StreamReader, conn: Connection, pending: bytes,
                       idle_timeout_s: float) -> bytes:
    """The next request line (b"" at end of stream), `pending` bytes first. Raises `IdleConnection` if an
    unattached connection stays silent for `idle_timeout_s` (0: never); raises ValueError past MAX_LINE."""
    if pending.endswith(b"\n"):
        return pending
    timeout = idle_timeout_s if conn.job is None and idle_timeout_s > 0 else None
    try:
        rest = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        raise IdleConnection() from None
    line = pending + rest
    if len(line) > MAX_LINE:
        raise ValueError("request line too long")
    return line


async def until_peer_leaves(reader: asyncio.StreamReader, work: Awaitable[dict]) -> tuple[dict | None, bytes]:
    """Run `work` (one request) while watching the connection: (reply, b"") when it finishes; (None, b"") if
    the peer closed the connection first (the work is cancelled); bytes the peer sent meanwhile (a pipelined
    request) come back as the second item, to be read before the next line."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(reader.read(1))
    pending = b""
    try:
        while True:
            done, _ = await asyncio.wait({task, watch} if not watch.done() else {task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if watch in done and not task.done():
                data = _received(watch)
                if data == b"":
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return None, b""
                pending += data  # a pipelined request: keep it, keep waiting for the reply
                continue
            break
        if watch.done():
            pending += _received(watch)
        return task.result(), pending
    finally:
        # Both are finished before the connection reads again (a cancelled read still holds the reader until
        # its task has run).
        for pending_task in (watch, task):
            if not pending_task.done():
                pending_task.cancel()
        await asyncio.gather(watch, task, return_exceptions=True)


def _received(watch: asyncio.Future) -> bytes:
    """What the watching read got: b"" for end of stream, a reset or a cancelled read."""
    if watch.cancelled() or watch.exception() is not None:
        return b""
    return watch.result()
