"""CPU per GET of the fetcher's two transports, side by side on one SeaweedFS server on loopback.

    python -m bench.get_overhead [--sizes 1024,2400000] [--gets 200]

Prints, per object size, the client process's CPU milliseconds per GET for `S3Store` through aiobotocore
(what signed access uses) and through aiohttp (unsigned access, `prefetchd/http_get.py`), and their ratio.
Both run in this process, alternating, against the same server, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile

import uvloop

from bench.servers import S3Server
from prefetchd.counters import FetchCounters
from prefetchd.fetch import S3Store
from prefetchd.http_get import make_http_session
from prefetchd.dev.locals3 import admin_client
from prefetchd.s3 import make_s3_client

BUCKET = "getbench"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def cpu_per_get(store: S3Store, key: str, gets: int, concurrency: int) -> float:
    for _ in range(3):
        await store.get(key)
    queue = list(range(gets))

    async def worker():
        while queue:
            queue.pop()
            await store.get(key)

    t0 = cpu_s()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (cpu_s() - t0) * 1e3 / gets


async def measure(endpoint: str, sizes: list[int], gets: int, concurrency: int, rounds: int) -> None:
    cfg = {"endpoint_url": endpoint, "unsigned": True, "max_concurrency": concurrency}
    async with make_s3_client(cfg) as client, make_http_session(cfg) as http:
        semaphore = asyncio.Semaphore(concurrency)
        stores = {
            "aiobotocore": S3Store(client, BUCKET, semaphore, FetchCounters(), verify_md5=False),
            "aiohttp": S3Store(client, BUCKET, semaphore, FetchCounters(), verify_md5=False, http=http),
        }
        print(f"{'object bytes':>12}  {'aiobotocore ms/GET':>18}  {'aiohttp ms/GET':>14}  ratio")
        for size in sizes:
            totals = {name: 0.0 for name in stores}
            for _ in range(rounds):    # alternate, so drift in machine load hits both
                for name, store in stores.items():
                    totals[name] += await cpu_per_get(store, f"obj-{size}", gets, concurrency) / rounds
            a, b = totals["aiobotocore"], totals["aiohttp"]
            print(f"{size:>12}  {a:>18.2f}  {b:>14.2f}  {a / b:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.get_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2400000", help="object sizes in bytes, comma-separated")
    ap.add_argument("--gets", type=int, default=200, help="GETs per transport, size and round")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as workdir, S3Server("seaweedfs", workdir) as server:
        admin = admin_client(server.endpoint_url)
        admin.create_bucket(Bucket=BUCKET)
        for size in sizes:
            admin.put_object(Bucket=BUCKET, Key=f"obj-{size}", Body=os.urandom(size))
        uvloop.run(measure(server.endpoint_url, sizes, a.gets, a.concurrency, a.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
