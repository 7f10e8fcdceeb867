"""A TCP proxy that makes a loopback S3 server behave like S3 seen from a cloud VM.

    python -m bench.latency_proxy --upstream 127.0.0.1:8333 [--latency-ms 30] [--conn-mbps 0] [--total-mbps 0]

Prints `listening <port> stats <port>` on its first stdout line. Per HTTP request (HTTP/1.1 keep-alive:
a request is the first client→server bytes after the server has answered), the request is held for
`latency` before it is forwarded, so the first response byte arrives ≥ latency later (plus server time).
Response bytes pass through two token buckets: one per connection (`--conn-mbps`) and one shared by all
connections (`--total-mbps`); 0 = unlimited. MB = 10^6 bytes.

Cheap on CPU: uvloop, 256 KiB reads, no parsing. Connecting to the stats port returns one JSON line
(connections, requests, bytes up/down) — neutral GET/byte counts for any client.

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

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n  # may go negative: the debt is slept off, concurrent takers queue behind it
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class Stats:
    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def to_dict(self) -> dict:
        return dict(connections=self.connections, requests=self.requests, bytes_up=self.bytes_up,
                    bytes_down=self.bytes_down)


async def serve(upstream: tuple[str, int], latency_s: float, conn_rate: float, total_rate: float,
                host: str = "127.0.0.1", port: int = 0, stats_port: int = 0) -> None:
    stats = Stats()
    total = TokenBucket(total_rate)

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            sreader, swriter = await asyncio.open_connection(*upstream)
        except OSError:
            cwriter.close()
            return
        state = {"new_request": True}
        per_conn = TokenBucket(conn_rate)

        async def up() -> None:
            try:
                while data := await creader.read(CHUNK):
                    if state["new_request"]:
                        state["new_request"] = False
                        stats.requests += 1
                        if latency_s > 0:
                            await asyncio.sleep(latency_s)
                    stats.bytes_up += len(data)
                    swriter.write(data)
                    await swriter.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    swriter.write_eof()
                except (OSError, RuntimeError):
                    pass

        async def down() -> None:
            try:
                while data := await sreader.read(CHUNK):
                    state["new_request"] = True
                    n = len(data)
                    stats.bytes_down += n
                    await per_conn.take(n)
                    await total.take(n)
                    cwriter.write(data)
                    await cwriter.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                cwriter.close()

        try:
            await asyncio.gather(up(), down())
        finally:
            swriter.close()

    async def handle_stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((json.dumps(stats.to_dict()) + "\n").encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port, backlog=512)
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
