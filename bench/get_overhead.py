"""CPU per GET of the fetcher's transports, side by side, on one local S3 server over http and https.

    python -m bench.get_overhead [--sizes 1024,2600000] [--gets 200] [--schemes http,https]

Prints, per scheme and object size, the milliseconds of CPU per GET that `S3Store` costs through each
`s3.get_transport` (obstore, aiohttp, botocore): on the event loop's thread (`main`, what caps one daemon) and
in the whole process (`process`, every thread: obstore's Rust workers, TLS), and GETs/s. All transports run
in this process, alternating round by round against the same server (`rclone serve s3`; https with a CA
made for the run, trusted through AWS_CA_BUNDLE), so machine noise hits them alike. MD5 checks are off:
this is the transport alone. When `awscrt` is installed (not a dependency) its S3Client runs too, over http,
as a getter of the same shape: the Python API hands each body chunk to a callback under the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

import uvloop

from bench.servers import S3Server
from prefetchd.counters import FetchCounters
from prefetchd.fetch import S3Store
from prefetchd.get_transport import make_get_transport
from prefetchd.http_get import Fetched
from prefetchd.s3 import make_s3_client

BUCKET = "getbench"
TRANSPORTS = ("obstore", "aiohttp", "botocore")


class CrtGetter:
    """awscrt's S3Client (the CRT) as a getter: plain http to a local endpoint, body chunks via callback."""

    def __init__(self, endpoint: str, bucket: str):
        from urllib.parse import urlsplit

        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
        from awscrt.s3 import S3Client, S3RequestTlsMode

        u = urlsplit(endpoint)
        self.host, self.bucket = u.netloc, bucket
        group = EventLoopGroup()
        self.client = S3Client(bootstrap=ClientBootstrap(group, DefaultHostResolver(group)), region="us-east-1",
                               tls_mode=S3RequestTlsMode.DISABLED)

    async def get(self, key: str) -> Fetched:
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        loop = asyncio.get_running_loop()
        done = loop.create_future()
        body = bytearray()

        def on_done(error=None, **_):
            result = (error, bytes(body))
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        request = HttpRequest("GET", f"/{self.bucket}/{key}", HttpHeaders([("host", self.host)]))
        self._request = self.client.make_request(type=S3RequestType.DEFAULT, request=request, operation_name="GetObject",
                                                 on_body=lambda chunk, offset, **_: body.extend(chunk), on_done=on_done)
        error, data = await done
        if error:
            raise error
        return Fetched(data, len(data), None)


async def cpu_per_get(store: S3Store, key: str, gets: int, concurrency: int) -> tuple[float, float, float]:
    """(main-thread ms, process ms, GETs/s) per GET."""
    for _ in range(3):
        await store.get(key)
    queue = list(range(gets))

    async def worker():
        while queue:
            queue.pop()
            await store.get(key)

    main0, proc0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    return (time.thread_time() - main0) * 1e3 / gets, (time.process_time() - proc0) * 1e3 / gets, gets / wall


async def measure(endpoint: str, scheme: str, sizes: list[int], gets: int, concurrency: int, rounds: int) -> None:
    stores = {}
    async with make_s3_client({"endpoint_url": endpoint}) as client, contextlib.AsyncExitStack() as stack:
        semaphore = asyncio.Semaphore(concurrency)
        for name in TRANSPORTS:
            cfg = {"endpoint_url": endpoint, "unsigned": True, "max_concurrency": concurrency, "get_transport": name}
            transport = await stack.enter_async_context(make_get_transport(cfg))
            stores[name] = S3Store(client, BUCKET, semaphore, FetchCounters(), verify_md5=False,
                                   getter=transport.getter(client, BUCKET))
        with contextlib.suppress(ImportError):
            if scheme == "http":
                stores["awscrt"] = S3Store(client, BUCKET, semaphore, FetchCounters(), verify_md5=False,
                                           getter=CrtGetter(endpoint, BUCKET))
        print(f"{scheme:5} {'object bytes':>12}  " + "  ".join(f"{n + ' main/process ms, GET/s':>34}" for n in stores))
        for size in sizes:
            totals = {name: [0.0, 0.0, 0.0] for name in stores}
            for _ in range(rounds):    # alternate, so drift in machine load hits all
                for name, store in stores.items():
                    for i, v in enumerate(await cpu_per_get(store, f"obj-{size}", gets, concurrency)):
                        totals[name][i] += v / rounds
            cells = [f"{m:>10.3f} / {p:>6.2f} / {r:>7.0f}" for m, p, r in totals.values()]
            base = totals["aiohttp"][0] / totals["obstore"][0]
            print(f"{scheme:5} {size:>12}  " + "  ".join(f"{c:>34}" for c in cells)
                  + f"   main: aiohttp ÷ obstore = {base:.1f}×")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.get_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2600000", help="object sizes in bytes, comma-separated")
    ap.add_argument("--gets", type=int, default=200, help="GETs per transport, size and round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--schemes", default="http,https")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        data = Path(workdir) / "data" / BUCKET
        data.mkdir(parents=True)
        for size in sizes:
            (data / f"obj-{size}").write_bytes(os.urandom(size))
        for scheme in a.schemes.split(","):
            with S3Server("rclone", workdir, tls=scheme == "https") as server:
                if server.ca_file:
                    os.environ["AWS_CA_BUNDLE"] = str(server.ca_file)
                uvloop.run(measure(server.endpoint_url, scheme, sizes, a.gets, a.concurrency, a.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
