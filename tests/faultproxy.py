"""A fault-injecting HTTP/1.1 TCP proxy for S3 (moto) — real sockets, its own event loop thread.

    proxy = FaultProxy(upstream="http://127.0.0.1:5000").start()
    proxy.add_rule("503", first_n=2)                       # the first 2 matching GETs get 503 SlowDown
    proxy.add_rule("corrupt", match="r01c01f01", probability=1.0)
    ... daemon with s3.endpoint_url=proxy.url ...
    proxy.stop()

Modes: 503 (SlowDown), 500 (InternalError), 403 (AccessDenied), 404 (NoSuchKey), reset (RST after half
the body), truncate (Content-Length announced, half the body, then FIN), stall (half the body then
silence for `stall_s`), corrupt (same length, bytes flipped in the middle of the body), trickle (the whole
answer, `chunk` bytes every `interval_s`: slow but never silent for long).
Rules apply to GETs of object keys (never LIST/HEAD) whose path contains `match`; the first rule that
fires wins. Every request and the fault it got are recorded in `proxy.log`.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MODES = ("503", "500", "403", "404", "301", "reset", "truncate", "stall", "corrupt", "trickle")
_ERRORS = {
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
    "403": (b"403 Forbidden", b"AccessDenied", b"Access Denied"),
    "404": (b"404 Not Found", b"NoSuchKey", b"The specified key does not exist."),
    # what S3 answers a request sent to the wrong region's endpoint (no Location header: not followable)
    "301": (b"301 Moved Permanently", b"PermanentRedirect", b"The bucket you are attempting to access must be "
            b"addressed using the specified endpoint. Please send all future requests to this endpoint."),
}


@dataclass
class Rule:
    mode: str
    match: str | None = None
    first_n: int | None = None      # fire on the first N matching requests, then never
    probability: float = 1.0        # else fire with this probability
    stall_s: float = 30.0
    chunk: int = 32768              # trickle: bytes per write
    interval_s: float = 0.1         # trickle: pause between writes
    strip_checksums: bool = False   # corrupt: also drop x-amz-checksum-* (objects uploaded without them)
    fired: int = 0
    seen: int = 0

    def fires(self, rng: random.Random) -> bool:
        self.seen += 1
        if self.first_n is not None:
            hit = self.fired < self.first_n
        else:
            hit = rng.random() < self.probability
        self.fired += hit
        return hit


@dataclass
class Record:
    method: str
    path: str
    fault: str | None


@dataclass
class FaultProxy:
    upstream: str
    seed: int = 0
    rules: list[Rule] = field(default_factory=list)
    log: list[Record] = field(default_factory=list)

    def __post_init__(self):
        u = urlsplit(self.upstream)
        self._up = (u.hostname, u.port or 80)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control (from the test thread) -----------------------------------------------------

    def add_rule(self, mode: str, **kw) -> Rule:
        assert mode in MODES, mode
        rule = Rule(mode, **kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def faults(self, mode: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.log if r.fault and (mode is None or r.fault == mode)]

    def start(self) -> "FaultProxy":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def cancel_all() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the proxy ------------------------------------------------------------------------

    def _pick(self, method: str, path: str) -> Rule | None:
        if method != "GET" or "?" in path or path.count("/") < 2:
            return None  # only object GETs: LIST (query string) and bucket-level requests pass
        with self._lock:
            for rule in self.rules:
                if rule.match is None or rule.match in path:
                    if rule.fires(self._rng):
                        return rule
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio keeps only weak references to connection tasks: one waiting on a dropped client could be
        # garbage-collected mid-await ("Task was destroyed but it is pending!"). Hold it until it ends.
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [l for l in lines[1:] if l]
                length = next((int(l.split(":", 1)[1]) for l in headers if l.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                rule = self._pick(method, path)
                with self._lock:
                    self.log.append(Record(method, path, rule.mode if rule else None))
                if rule is not None and rule.mode in _ERRORS:
                    writer.write(_error_response(rule.mode))
                    await writer.drain()
                    continue
                status, resp_headers, resp_body = await self._forward(method, path, headers, body)
                if rule is None or method == "HEAD":
                    writer.write(_response(status, resp_headers, resp_body))
                    await writer.drain()
                    continue
                half = len(resp_body) // 2
                if rule.mode == "trickle":
                    whole = _response(status, resp_headers, resp_body)
                    for start in range(0, len(whole), rule.chunk):
                        if start:
                            await asyncio.sleep(rule.interval_s)
                        writer.write(whole[start : start + rule.chunk])
                        await writer.drain()
                    continue
                if rule.mode == "corrupt":
                    flipped = bytes(b ^ 0x5A for b in resp_body[half : half + 64])
                    if rule.strip_checksums:
                        resp_headers = [h for h in resp_headers if not h.lower().startswith("x-amz-checksum")]
                    writer.write(_response(status, resp_headers, resp_body[:half] + flipped + resp_body[half + 64 :]))
                    await writer.drain()
                    continue
                writer.write(_response(status, resp_headers, resp_body)[: -(len(resp_body) - half) or None])
                await writer.drain()
                if rule.mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if rule.mode == "stall":
                    try:
                        await asyncio.wait_for(reader.read(), rule.stall_s)  # until the client gives up
                    except asyncio.TimeoutError:
                        pass
                break  # truncate (and a stall that ends): FIN with the body short
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _forward(self, method: str, path: str, headers: list[str], body: bytes):
        r, w = await asyncio.open_connection(*self._up)
        try:
            kept = [h for h in headers if not h.lower().startswith(("connection:", "keep-alive:"))]
            w.write(f"{method} {path} HTTP/1.1\r\n".encode("latin-1") +
                    "".join(h + "\r\n" for h in kept).encode("latin-1") + b"Connection: close\r\n\r\n" + body)
            await w.drain()
            raw = await r.read()
        finally:
            w.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 1)[1]
        resp_headers = [l for l in lines[1:] if l.split(":", 1)[0].lower() not in
                        ("connection", "keep-alive", "transfer-encoding", "content-length")]
        chunked = any(l.lower().startswith("transfer-encoding:") and "chunked" in l.lower() for l in lines[1:])
        if method == "HEAD":
            cl = next((l for l in lines[1:] if l.lower().startswith("content-length:")), None)
            return status, resp_headers + ([cl] if cl else []), b""
        return status, resp_headers, _dechunk(rest) if chunked else rest


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def _response(status: str, headers: list[str], body: bytes) -> bytes:
    # a HEAD's headers carry the object's Content-Length already (its body is empty)
    length = "" if any(h.lower().startswith("content-length:") for h in headers) else f"Content-Length: {len(body)}\r\n"
    return (f"HTTP/1.1 {status}\r\n" + "".join(h + "\r\n" for h in headers) + length + "\r\n").encode("latin-1") + body


def _error_response(mode: str) -> bytes:
    status, code, message = _ERRORS[mode]
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>" + message +
            b"</Message><RequestId>faultproxy</RequestId></Error>")
    region = b"x-amz-bucket-region: eu-west-1\r\n" if mode == "301" else b""
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nx-amz-request-id: faultproxy\r\n" + region +
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
