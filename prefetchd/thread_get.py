"""Unsigned GETs on worker threads with blocking sockets: a body is received straight into the buffer it ends up in.

Each GET runs on a thread of the transport's pool (`GetTransport.pool`) over a keep-alive connection from a
small pool; the event loop only hands a whole field to a thread and gets one answer back (`receive.py`). The
body is read with `recv_into`, so the kernel copies it once, into the caller's buffer: an arena slot's plane
when the pixels need no preprocessing, else a reused buffer that decoding reads in place. SO_RCVLOWAT makes
the kernel gather up to a whole body (`LOWAT`) before it wakes the reader: one wake-up per body instead of one
per few hundred KB (`python -m bench.ceiling`: a fifth of the daemon's CPU per raw field). `s3.read_timeout_s`
still bounds a stall, not a slow body: a read that times out with bytes waiting in the kernel goes on reading
what comes. Reading releases the GIL; what holds it is ~30 µs of request and head
handling per GET. `python -m bench.ceiling` measures this transport against obstore and aiohttp.

The HTTP here is the subset an S3 GET needs: one `GET` with `Host`, a status line and headers, a
`Content-Length` body (a chunked or unbounded one is read too, for error answers), keep-alive. `http.client`
does the same with ~5× the CPU per request (its header parsing), which at five GETs per field is a tenth of the
daemon's CPU budget per field; everything beyond it (retries, checks, errors) is the fetcher's, as for every
transport.

What the fetcher relies on, as on the other transports (`get_transport.py`): one attempt per call (retries,
jitter, throttle feedback and body checks are `S3Store`'s); errors are what botocore raises (`ClientError` from
the S3 XML error body, with the region header of a 301), or `ConnectionRefusedError`, `socket.gaierror`,
`TimeoutError`, `CertificateNotTrusted`, `ConnectionError` for a body that broke; the object URL is the one
botocore would GET (`http_get.object_url_template`); `s3.connect_timeout_s` bounds connecting and
`s3.read_timeout_s` every read; `HTTP(S)_PROXY` / `NO_PROXY` as botocore honours them (a CONNECT tunnel for
https); `AWS_CA_BUNDLE` for private CAs. Signed access is not done here: `auto` picks obstore for it.

A GET in flight can be stopped from another thread (`Abort`: its sockets are shut down), so closing a job never
leaves a thread writing into an arena that is gone.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fcntl
import hashlib
import socket
import ssl
import struct
import termios
import threading
import urllib.request
from concurrent.futures import Executor
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from prefetchd.http_get import Fetched, client_error, object_url_template, quote_key, ssl_context
from prefetchd.obstore_get import CertificateNotTrusted

LOWAT = 4 << 20          # bytes the kernel gathers before it wakes a reader (SO_RCVLOWAT; it caps this at half
                         # of net.ipv4.tcp_rmem's maximum and grows the receive buffer to fit)
# Over TLS up to one record of what is still to come may already sit in OpenSSL's buffer, so the kernel may never
# hold as many bytes as remain to be read: a low-water mark that high would wait for the read timeout.
TLS_SLACK = 16384 + 1024
HEAD_MAX = 64 << 10      # a response head larger than this is an error
ERROR_BODY_MAX = 1 << 20


class Aborted(Exception):
    """The fill this GET belongs to was stopped (its job is closing)."""


class Abort:
    """Stops the GETs of one fill from another thread: a flag they check, and their sockets shut down."""

    def __init__(self):
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def trigger(self) -> None:
        with self._lock:
            self.event.set()
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        if self.event.is_set():
            raise Aborted("stopped")

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            stopped = self.event.is_set()
        if stopped:
            raise Aborted("stopped")

    def unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)


NEVER_ABORTED = Abort()


class _Stale(Exception):
    """A pooled connection was closed by the server before it answered."""


class Target:
    """Where a bucket's GETs go: the object URL's scheme, host and path prefix, and the proxy for it."""

    def __init__(self, prefix: str, suffix: str):
        self.prefix, self.suffix = prefix, suffix
        url = urlsplit(prefix)
        self.scheme, self.host = url.scheme, url.hostname or ""
        self.port = url.port or (443 if self.scheme == "https" else 80)
        self.netloc = url.netloc
        self.base = prefix[len(f"{url.scheme}://{url.netloc}"):]
        self.proxy: tuple[str, int] | None = None
        self.proxy_auth = ""
        proxy = urllib.request.getproxies().get(self.scheme)
        if proxy and not urllib.request.proxy_bypass(self.host):
            p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
            self.proxy = (p.hostname or "", p.port or 80)
            if p.username:
                token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
                self.proxy_auth = f"Proxy-Authorization: Basic {token}\r\n"

    def request(self, key: str) -> bytes:
        path = self.base + quote_key(key) + self.suffix
        through = self.proxy is not None and self.scheme == "http"
        line = f"GET http://{self.netloc}{path} HTTP/1.1\r\n" if through else f"GET {path} HTTP/1.1\r\n"
        return (f"{line}Host: {self.netloc}\r\nUser-Agent: prefetchd\r\nAccept-Encoding: identity\r\n"
                f"{self.proxy_auth if through else ''}\r\n").encode()


class Response:
    """A response's status line and headers; `prefix` holds the body bytes read along with them."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], prefix: memoryview, version: bytes):
        self.status, self.reason, self.headers, self.prefix = status, reason, headers, prefix
        self.length = int(headers["content-length"]) if "content-length" in headers else None
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection and (version == b"HTTP/1.1" or "keep-alive" in connection)


class Connection:
    """One keep-alive HTTP/1.1 connection (TLS, or through the environment's proxy, as the target says)."""

    def __init__(self, target: Target, connect_timeout: float, read_timeout: float, context: ssl.SSLContext | None):
        self.target = target
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.context = context
        self.sock: socket.socket | None = None
        self.head = bytearray(HEAD_MAX)
        self.lowat = 1
        self.slack = TLS_SLACK if target.scheme == "https" else 0

    def open(self) -> None:
        t = self.target
        sock = socket.create_connection(t.proxy or (t.host, t.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.scheme == "https":
                if t.proxy:
                    self.sock = sock
                    self._tunnel()
                try:
                    sock = self.context.wrap_socket(sock, server_hostname=t.host)
                except ssl.SSLCertVerificationError as exc:
                    raise CertificateNotTrusted(f"{t.host}: {exc.verify_message or exc}") from None
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            self.sock = None
            raise
        self.sock = sock
        self.lowat = 1

    def _tunnel(self) -> None:
        t = self.target
        self.sock.sendall(f"CONNECT {t.host}:{t.port} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n{t.proxy_auth}\r\n"
                          .encode())
        response = self.read_head()
        if response.status != 200:
            raise ConnectionError(f"the proxy {t.proxy[0]}:{t.proxy[1]} refused CONNECT {t.host}:{t.port} "
                                  f"({response.status} {response.reason})")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def read_head(self) -> Response:
        self.set_lowat(1)
        head, view = self.head, memoryview(self.head)
        got = 0
        while True:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise (_Stale() if got == 0 else ConnectionError("the connection closed inside a response head"))
            got += k
            end = head.find(b"\r\n\r\n", max(0, got - k - 3), got)
            if end >= 0:
                break
            if got == len(head):
                raise ConnectionError(f"a response head longer than {HEAD_MAX} bytes")
        lines = bytes(view[:end]).split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/") or not code.isdigit():
            raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        return Response(int(code), reason.decode("latin-1"), headers, view[end + 4 : got], version)

    def set_lowat(self, n: int) -> None:
        if n != self.lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n

    def queued(self) -> int:
        """Bytes received by the kernel and not read yet."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class Body:
    """A response body being read: `readinto` fills a buffer exactly (or raises), hashing what passes when asked."""

    def __init__(self, conn: Connection, response: Response, md5: bool, abort: Abort):
        self.conn = conn
        self.size = response.length
        self.done = 0
        self.prefix = response.prefix
        self.md5 = hashlib.md5() if md5 else None
        self.abort = abort
        self.gather = LOWAT      # bytes to let the kernel gather per wake-up; 1 once the body proved slow

    def readinto(self, buffer) -> None:
        view = memoryview(buffer).cast("B")
        n = len(view)
        got = min(n, len(self.prefix))
        if got:
            view[:got] = self.prefix[:got]
            self.prefix = self.prefix[got:]
        conn = self.conn
        sock = conn.sock
        while got < n:
            self.abort.check()
            conn.set_lowat(max(1, min(self.gather, n - got - conn.slack)))
            try:
                k = sock.recv_into(view[got:], n - got)
            except socket.timeout:
                if conn.lowat > 1 and conn.queued() > 0:    # slow, not stalled: take what comes from here on
                    self.gather = 1
                    continue
                raise
            if not k:
                raise ConnectionError(f"the body ended after {self.done + got} of {self.size} bytes (IncompleteBody)")
            got += k
        if self.md5 is not None:
            self.md5.update(view)
        self.done += n

    def skip(self, n: int, scratch) -> None:
        """Read (and hash) `n` bytes that go nowhere, through `scratch`."""
        view = memoryview(scratch).cast("B")
        while n > 0:
            k = min(n, len(view))
            self.readinto(view[:k])
            n -= k


# A sink places one body: called with the `Body` once the status is 200, it must read exactly `body.size`
# bytes and return what the caller gets back as `Fetched.data`.
Sink = Callable[[Body], Any]


def into_new_buffer(body: Body) -> bytearray:
    data = bytearray(body.size)
    body.readinto(data)
    return data


class Connections:
    """Idle keep-alive connections to one target, shared by the transport's threads."""

    def __init__(self, target: Target, connect_timeout: float, read_timeout: float, keep: int,
                 context: ssl.SSLContext | None):
        self.target = target
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.keep = keep
        self.context = context
        self._idle: collections.deque[Connection] = collections.deque()
        self._lock = threading.Lock()

    def take(self) -> tuple[Connection, bool]:
        """(a connection, whether it was used before)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.new(), False

    def new(self) -> Connection:
        return Connection(self.target, self.connect_timeout, self.read_timeout, self.context)

    def give_back(self, conn: Connection) -> None:
        if conn.sock is None:
            return
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()


class ThreadGetter:
    """GETs of one bucket's objects on the transport's threads (unsigned)."""

    name = "threads"

    def __init__(self, s3: dict[str, Any], bucket: str, client: Any, pool: Executor, field_pool: Executor):
        self.s3 = s3
        self.bucket = bucket
        self.client = client           # the botocore client: the object URL it would GET
        self.pool = pool               # one GET per task
        self.field_pool = field_pool   # one field per task (`receive.py`), which hands its channels to `pool`
        self.connections: Connections | None = None

    async def prepare(self) -> None:
        """Resolve the bucket's object URL (once, on the event loop): GETs on threads need it."""
        if self.connections is None:
            prefix, suffix = await object_url_template(self.client, self.bucket)
            target = Target(prefix, suffix)
            self.connections = Connections(
                target, float(self.s3.get("connect_timeout_s", 5.0)), float(self.s3.get("read_timeout_s", 30.0)),
                keep=int(self.s3.get("max_concurrency", 32)),
                context=ssl_context() if target.scheme == "https" else None)

    async def get(self, key: str) -> Fetched:
        await self.prepare()
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.get_into, key, into_new_buffer)

    def get_into(self, key: str, sink: Sink, md5: bool = False, abort: Abort = NEVER_ABORTED) -> Fetched:
        """One GET on this thread (after `prepare`): the body through `sink`. A pooled connection the server has
        closed meanwhile is replaced once, silently (it answered nothing)."""
        conns = self.connections
        conn, reused = conns.take()
        while True:
            try:
                outcome, keep = self._get_on(conn, key, sink, md5, abort, reused)
            except _Stale:
                conn.close()
                if not reused:
                    raise ConnectionError("the connection closed before the response") from None
                conn, reused = conns.new(), False
                continue
            except BaseException:
                conn.close()
                raise
            if keep:
                conns.give_back(conn)
            else:
                conn.close()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    def _get_on(self, conn: Connection, key: str, sink: Sink, md5: bool, abort: Abort,
                reused: bool) -> tuple[Fetched | BaseException, bool]:
        """(what the response on `conn` fetched, or the ClientError of a non-200 answer; whether the connection
        can serve another request)."""
        target = conn.target
        if conn.sock is None:
            conn.open()
        sock = conn.sock
        abort.watch(sock)
        try:
            try:
                sock.sendall(target.request(key))
                response = conn.read_head()
            except (BrokenPipeError, ConnectionResetError, _Stale):
                if reused and not abort.event.is_set():
                    raise _Stale() from None
                raise
            if response.status != 200:
                body = self._small_body(conn, response)
                return client_error(response.status, body, response.reason, response.headers), \
                    response.keep_alive and response.length is not None
            if response.length is None:        # S3 always sends a length; read what comes, then drop the connection
                data = self._small_body(conn, response, limit=None)
                return Fetched(data, len(data), response.headers.get("etag"),
                               hashlib.md5(data).hexdigest() if md5 else None), False
            body = Body(conn, response, md5, abort)
            data = sink(body)
            if body.done != body.size:
                raise ConnectionError(f"the sink read {body.done} of {body.size} bytes")
            conn.set_lowat(1)
            return Fetched(data, body.size, response.headers.get("etag"), body.md5.hexdigest() if md5 else None), \
                response.keep_alive
        except socket.timeout as exc:
            raise TimeoutError(f"reading from {target.netloc} timed out") from exc
        except OSError:
            abort.check()                      # a socket shut down by `Abort` reads as a reset: say why
            raise
        finally:
            abort.unwatch(sock)

    def _small_body(self, conn: Connection, response: Response, limit: int | None = ERROR_BODY_MAX) -> bytes:
        """A whole (error, or unbounded) body as bytes: by length, chunks, or until the server closes."""
        if response.length is not None:
            if limit is not None and response.length > limit:
                raise ConnectionError(f"an error answer of {response.length} bytes")
            data = bytearray(response.length)
            Body(conn, response, False, NEVER_ABORTED).readinto(data)
            return bytes(data)
        reader = _Stream(conn.sock, response.prefix)
        if response.chunked:
            out = bytearray()
            while True:
                size = int(reader.line().split(b";")[0], 16)
                if size == 0:
                    while reader.line():       # trailers, then the empty line
                        pass
                    return bytes(out)
                out += reader.exactly(size)
                reader.exactly(2)
        return reader.rest(limit)

    def close(self) -> None:
        if self.connections is not None:
            self.connections.close()


class _Stream:
    """Bytes of a socket after `prefix`: lines and exact counts (for chunked or unbounded bodies)."""

    def __init__(self, sock: socket.socket, prefix: memoryview):
        self.sock = sock
        self.buf = bytearray(prefix)

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError("the connection closed inside a chunked body")
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ConnectionError("the connection closed inside a chunked body")
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def rest(self, limit: int | None) -> bytes:
        while self._more():
            if limit is not None and len(self.buf) > limit:
                raise ConnectionError(f"an answer longer than {limit} bytes")
        return bytes(self.buf)
