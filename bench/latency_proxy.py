"""A TCP proxy that makes a loopback S3 server behave like S3 seen from a cloud VM.

    python -m bench.latency_proxy --upstream 127.0.0.1:8333 [--latency-ms 30] [--conn-mbps 0] [--total-mbps 0]

Prints `listening <port> stats <port>` on its first stdout line. Per HTTP request (HTTP/1.1 keep-alive:
a request is the first client→server bytes after the server has answered), the request is held for
`latency` before it is forwarded, so the first response byte arrives ≥ latency later (plus server time).
Response bytes pass through two token buckets: one per connection (`--conn-mbps`) and one shared by all
connections (`--total-mbps`); 0 = unlimited. MB = 10^6 bytes.

Cheap on CPU: uvloop protocols, bytes relayed from callback to transport, no parsing beyond a request's first line.
Connecting to the stats port returns one JSON line (connections, requests, bytes up/down, and per object kind —
`tiff_requests`, `tiff_bytes_down`, `npy_…`, `other_…`) — neutral GET/byte counts for any client.

`LatencyProxy` starts it as a subprocess (its own process, so its CPU is measured separately).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

CHUNK = 256 * 1024


class TokenBucket:
    def __init__(self, rate_bytes_s: float, burst: float | None = None):
        self.rate = rate_bytes_s
        self.capacity = burst if burst is not None else max(CHUNK, rate_bytes_s * 0.05)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def delay(self, n: int) -> float:
        """Take n bytes; seconds to hold them (the debt; concurrent takers queue behind it)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class Stats:
    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.by_suffix: dict[str, list[int]] = {}   # "tiff" / "npy" / "other" -> [requests, bytes down]

    def to_dict(self) -> dict:
        """Flat numbers (callers subtract two snapshots key by key): `tiff_requests`, `npy_bytes_down`, ..."""
        per_kind = {f"{k}_{what}": v for k, counts in self.by_suffix.items()
                    for what, v in zip(("requests", "bytes_down"), counts)}
        return dict(connections=self.connections, requests=self.requests, bytes_up=self.bytes_up,
                    bytes_down=self.bytes_down, **per_kind)


def suffix_of(request_head: bytes) -> str:
    """`tiff`, `npy` or `other`, from a request's first bytes ("GET /bucket/key.npy HTTP/1.1")."""
    line = request_head[:request_head.find(b"\r\n")] if b"\r\n" in request_head else request_head[:2048]
    path = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
    path = path.split(b"?")[0]
    for suffix in (b".tiff", b".tif", b".npy"):
        if path.endswith(suffix):
            return "tiff" if suffix == b".tif" else suffix.decode()[1:]
    return "other"


class _Side(asyncio.Protocol):
    """One socket of a relayed connection. Bytes go straight from data_received to the peer transport (no
    stream buffers or coroutine switches per chunk: the proxy's CPU is part of the simulated network, not of
    the systems measured). Reading pauses while the peer cannot take more, or while bytes are held back for
    latency or bandwidth; `holds` counts the reasons."""

    def __init__(self, relay: "_Relay"):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: "_Side | None" = None
        self.holds = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def hold(self) -> None:
        self.holds += 1
        if self.holds == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def unhold(self) -> None:
        self.holds -= 1
        if self.holds == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the peer
        if self.peer is not None:
            self.peer.hold()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.unhold()

    def connection_lost(self, exc) -> None:
        self.relay.close()


class _Relay:
    def __init__(self, loop, stats: Stats, latency_s: float, conn: TokenBucket, total: TokenBucket):
        self.loop, self.stats, self.latency_s = loop, stats, latency_s
        self.conn, self.total = conn, total
        self.client = _ClientSide(self)
        self.server = _ServerSide(self)
        self.client.peer, self.server.peer = self.server, self.client
        self.new_request = True
        self.kind: list[int] | None = None   # the by_suffix counters of the request being answered
        self.pending: list[bytes] = []   # client bytes before the upstream connection is up
        self.held_down = 0               # response chunks held back by the bandwidth caps
        self.held_up = 0                 # requests held back for latency
        self.eof_pending = False         # the client's EOF, passed on once the held requests are
        self.closing = False

    def to_server(self, data: bytes) -> None:
        if self.server.transport is None:
            self.pending.append(data)
            return
        self.stats.bytes_up += len(data)
        if self.new_request:
            self.new_request = False
            self.stats.requests += 1
            self.kind = self.stats.by_suffix.setdefault(suffix_of(data), [0, 0])
            self.kind[0] += 1
            if self.latency_s > 0:  # hold the request back: the first response byte comes >= latency later
                self.client.hold()
                self.held_up += 1
                self.loop.call_later(self.latency_s, self._forward_held, data)
                return
        self.server.transport.write(data)

    def _forward_held(self, data: bytes) -> None:
        self.held_up -= 1
        if not self.server.transport.is_closing():
            self.server.transport.write(data)
            if self.eof_pending and not self.held_up:
                self.eof_pending = False
                self.server.transport.write_eof()
        self.client.unhold()

    def to_client(self, data: bytes) -> None:
        self.new_request = True
        self.stats.bytes_down += len(data)
        if self.kind is not None:
            self.kind[1] += len(data)
        wait = max(self.conn.delay(len(data)), self.total.delay(len(data)))
        if wait > 0:
            self.server.hold()
            self.held_down += 1
            self.loop.call_later(wait, self._send_held, data)
        else:
            self.client.transport.write(data)

    def _send_held(self, data: bytes) -> None:
        self.held_down -= 1
        if not self.client.transport.is_closing():
            self.client.transport.write(data)
        self.server.unhold()
        if self.closing:
            self.close()

    def server_up(self) -> None:
        for data in self.pending:
            self.to_server(data)
        self.pending.clear()

    def close(self) -> None:
        self.closing = True
        if self.held_down:  # the server is done, but the caps still hold part of its answer: send it first
            return
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()  # after what the transport has buffered has gone out


class _ClientSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.relay.to_server(data)

    def eof_received(self):
        server = self.relay.server.transport
        if self.relay.held_up:   # a request is still held back for latency: the EOF follows it
            self.relay.eof_pending = True
        elif server is not None and server.can_write_eof():
            server.write_eof()
        return True  # half-open: the response may still be coming


class _ServerSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.relay.to_client(data)


async def serve(upstream: tuple[str, int], latency_s: float, conn_rate: float, total_rate: float,
                host: str = "127.0.0.1", port: int = 0, stats_port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    total = TokenBucket(total_rate)

    def accept() -> _ClientSide:
        stats.connections += 1
        relay = _Relay(loop, stats, latency_s, TokenBucket(conn_rate), total)
        loop.create_task(_connect(relay))
        return relay.client

    async def _connect(relay: _Relay) -> None:
        try:
            await loop.create_connection(lambda: relay.server, *upstream)
        except OSError:
            relay.close()
            return
        relay.server_up()

    async def handle_stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((json.dumps(stats.to_dict()) + "\n").encode())
        await writer.drain()
        writer.close()

    server = await loop.create_server(accept, host, port, backlog=512)
    stats_server = await asyncio.start_server(handle_stats, host, stats_port)
    print(f"listening {server.sockets[0].getsockname()[1]} stats {stats_server.sockets[0].getsockname()[1]}",
          flush=True)
    async with server, stats_server:
        await asyncio.gather(server.serve_forever(), stats_server.serve_forever())


class LatencyProxy:
    """Run the proxy as a subprocess; `endpoint_url`, `stats()`, `pid`, `stop()`."""

    def __init__(self, upstream_url: str, latency_ms: float = 30.0, conn_mbps: float = 0.0, total_mbps: float = 0.0):
        hostport = upstream_url.split("://", 1)[-1].rstrip("/")
        self.upstream = hostport
        self.latency_ms, self.conn_mbps, self.total_mbps = latency_ms, conn_mbps, total_mbps
        self.proc: subprocess.Popen | None = None
        self.port = self.stats_port = 0

    def start(self) -> "LatencyProxy":
        cmd = [sys.executable, "-m", "bench.latency_proxy", "--upstream", self.upstream,
               "--latency-ms", str(self.latency_ms), "--conn-mbps", str(self.conn_mbps),
               "--total-mbps", str(self.total_mbps)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 4:
            raise RuntimeError(f"latency proxy failed to start (exit {self.proc.poll()})")
        self.port, self.stats_port = int(line[1]), int(line[3])
        return self

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        import socket

        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as s:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return json.loads(data)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="host:port of the S3 server")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--stats-port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency per request")
    ap.add_argument("--conn-mbps", type=float, default=0.0, help="per-connection cap, MB/s (0 = none)")
    ap.add_argument("--total-mbps", type=float, default=0.0, help="total cap, MB/s (0 = none)")
    a = ap.parse_args(argv)
    uh, up = a.upstream.rsplit(":", 1)
    lh, lp = a.listen.rsplit(":", 1)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve((uh, int(up)), a.latency_ms / 1e3, a.conn_mbps * 1e6, a.total_mbps * 1e6,
                          lh, int(lp), a.stats_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
