"""The daemon: startup → serve the control socket → graceful shutdown (uvicorn's shape).

SIGTERM/SIGINT (or a `stop` request) drain: new requests are refused, waiting `next` calls get a
`stopping` error, arenas are unlinked, the socket file is removed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import signal
import socket
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from prefetchd import __version__
from prefetchd.concurrency import DEFAULT_MINIMUM, AdaptiveConcurrency
from prefetchd.config import Config
from prefetchd.counters import FetchCounters
from prefetchd.dataset import DatasetSpec, parse_dataset
from prefetchd.errors import PrefetchdError, ProtocolError
from prefetchd.disk_tier import DiskTier
from prefetchd.fetch import LocalStore, ObjectStore, S3Store
from prefetchd.get_transport import make_get_transport
from prefetchd.indexes import IndexRegistry, with_channels
from prefetchd.job import Job, JobSpec
from prefetchd.notify import sd_notify, watchdog_interval_s
from prefetchd.peercred import PeerPolicy, peer_credentials
from prefetchd.options import resolve_options
from prefetchd.protocol import MAX_LINE, decode_request, encode
from prefetchd.s3 import make_s3_client, resolve_endpoint
from prefetchd.shm.arena import SlotState, reap_stale_segments

log = logging.getLogger("prefetchd")


class Connection:
    """One client connection; after `attach` it speaks for one rank of one job."""

    def __init__(self, peer: str):
        self.peer = peer
        self.job: Job | None = None
        self.rank: int | None = None


# Config keys a SIGHUP may change live; everything else needs a restart (the old value is kept).
RELOADABLE = ("log_level", "defaults", "job", "index.wait_s", "s3.max_concurrency", "s3.get_concurrency",
              "s3.retries", "security")


class Server:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None):
        self.config = config
        self._reload = reload or _reload_from_argv
        self.peers = PeerPolicy.from_config(config)
        self._metrics_server: asyncio.AbstractServer | None = None
        self.metrics_port: int | None = None
        self.socket_path = config.socket_path
        self.started = time.monotonic()
        self.should_exit = asyncio.Event()
        self.counters = FetchCounters()
        self.disk_tiers: dict[str, DiskTier] = {}
        self.jobs: dict[str, Job] = {}
        self._job_starts: dict[str, asyncio.Future] = {}
        self._connections: set[asyncio.Task] = set()
        self._stack = contextlib.AsyncExitStack()
        self._server: asyncio.AbstractServer | None = None
        self.s3client: Any = None
        self.transport: Any = None    # how object GETs are made (get_transport.py: obstore by default)
        s3 = config.tree["s3"]
        # GETs in flight, all jobs together: adapts to throughput and backs off on 503 SlowDown.
        self.limiter = make_limiter(s3)
        self.pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self.indexes = IndexRegistry(s3, config.cache_dir, float(config.get("index.wait_s")))
        self._stats_closed_jobs = {"fields_served": 0, "cache_hits": 0, "cache_misses": 0, "stall_s": 0.0}
        self._quarantined_closed = 0  # status counters are cumulative: closed jobs still count

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        self._install_signal_handlers()
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        reaped = reap_stale_segments()
        if reaped:
            log.warning("removed %d shared-memory segment(s) left by a dead daemon: %s", len(reaped), ", ".join(reaped))
        s3 = self.config.tree["s3"]
        self.s3client = await self._stack.enter_async_context(make_s3_client(s3))
        self.transport = await self._stack.enter_async_context(make_get_transport(s3))
        await self._bind()
        await self._start_metrics()
        endpoint = resolve_endpoint(s3.get("endpoint_url")) or "AWS S3"
        log.info("prefetchd %s listening on %s (S3 endpoint: %s, GETs: %s, decode workers: %d)",
                 __version__, self.socket_path, endpoint, self.transport.name, self.config.decode_workers)
        sd_notify("READY=1\nSTATUS=listening on " + str(self.socket_path))

    async def _bind(self) -> None:
        path = self.socket_path
        group = self.config.get("shm.group")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if group else 0o700)
        if path.exists() or path.is_symlink():
            if _socket_answers(path):
                raise PrefetchdError(f"another prefetchd is already listening on {path}; "
                                     "stop it with `prefetchd stop` or use --socket", code="busy")
            path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(path), limit=MAX_LINE)
        os.chmod(path, 0o660 if group else 0o600)
        if group:
            gid = grp.getgrnam(group).gr_gid
            if os.stat(path).st_gid != gid:  # skip the syscall when it is a no-op (SystemCallFilter=~@privileged)
                os.chown(path, -1, gid)

    async def _start_metrics(self) -> None:
        port = int(self.config.get("metrics.port"))
        if not port:
            return
        from prefetchd.metrics import start_metrics_server

        host = self.config.get("metrics.address") or "127.0.0.1"
        try:
            self._metrics_server = await start_metrics_server(self.status, host, port)
        except OSError as exc:
            raise PrefetchdError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                                 "pick another metrics.port or 0 to turn metrics off", code="bad_config") from None
        self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.metrics_port)

    async def main_loop(self) -> None:
        watchdog = watchdog_interval_s()
        tick = min(1.0, watchdog) if watchdog else 1.0
        while not self.should_exit.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), tick)
            if watchdog:
                sd_notify("WATCHDOG=1")  # fed from the loop itself: a hung loop stops feeding it
            await self._reap_idle_jobs()

    async def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("shutting down: %d job(s), %d connection(s)", len(self.jobs), len(self._connections))
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        for job in list(self.jobs.values()):
            await self._close_job(job)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for job in list(self.jobs.values()):  # registered while the first jobs were closing
            await self._close_job(job)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        await self._stack.aclose()
        self.pool.shutdown(wait=True, cancel_futures=True)
        s = self.status()
        log.info("served %d fields (hits %d, misses %d), fetched %.1f MB in %d GETs, %d retries, stalled %.1f s, up %.0f s",
                 s["fields_served"], s["cache_hits"], s["cache_misses"], s["bytes_fetched"] / 1e6, s["gets"],
                 s["retries"], s["stall_s"], s["uptime_s"])

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s, draining", signal.Signals(sig).name)
        self.should_exit.set()

    def reload_config(self) -> None:
        """SIGHUP: re-read the config; apply what is safe live, keep (and name) what needs a restart."""
        sd_notify("RELOADING=1")
        try:
            fresh = self._reload()
        except Exception as exc:  # a broken file must not take the daemon down: keep running as is
            log.error("reload failed, keeping the current config: %s", getattr(exc, "message", exc))
            sd_notify("READY=1")
            return
        old, new = self.config.tree, fresh.tree
        tree = dict(old)
        changed, ignored = [], []
        for key in sorted(set(old) | set(new)):
            for path, a, b in _diff(key, old.get(key), new.get(key)):
                if path.startswith(RELOADABLE):
                    changed.append(path)
                else:
                    ignored.append(path)
        for key in RELOADABLE:
            _set_path(tree, key, _get_path(new, key))
        self.config = Config(tree)
        logging.getLogger().setLevel(str(self.config.get("log_level")).upper())
        self.indexes.wait_s = float(self.config.get("index.wait_s"))
        s3_new = self.config.tree["s3"]
        if (int(s3_new["max_concurrency"]), s3_new.get("get_concurrency")) != \
                (int(old["s3"]["max_concurrency"]), old["s3"].get("get_concurrency")):
            self.limiter.set_bounds(*limiter_bounds(s3_new))  # one limiter: all jobs together, attached or new
        self.peers = PeerPolicy.from_config(self.config)
        log.info("reloaded config: changed %s", ", ".join(changed) or "nothing")
        if ignored:
            log.warning("reload: %s changed but need a restart (`systemctl restart prefetchd`); kept the running values",
                        ", ".join(ignored))
        sd_notify("READY=1")

    # ---- connections -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        conn = Connection(peer=str(writer.get_extra_info("peername") or "local"))
        cred = peer_credentials(writer.get_extra_info("socket"))
        refusal = self.peers.check(cred)
        if refusal is not None:
            await self._refuse(reader, writer, cred, refusal)
            self._connections.discard(task)
            return
        try:
            while not self.should_exit.is_set():
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, ProtocolError(f"request longer than {MAX_LINE} bytes").to_reply())
                    break
                if not line:
                    break
                reply = await self._dispatch(line, conn)
                await _reply(writer, reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            if conn.job is not None and conn.rank is not None:
                conn.job.disconnect_rank(conn.rank)
            writer.close()

    async def _refuse(self, reader, writer, cred, reason: str) -> None:
        log.warning("refused control connection from %s: %s", cred or "unknown peer", reason)
        try:
            await _reply(writer, PrefetchdError(reason, code="forbidden").to_reply())
            # Consume the peer's first request (bounded) so closing does not reset the reply away.
            with contextlib.suppress(asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.readline(), 2.0)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes, conn: Connection) -> dict:
        try:
            request = decode_request(line)
            handler = getattr(self, "op_" + request.pop("op"))
            return await handler(conn, **request)
        except PrefetchdError as exc:
            return exc.to_reply()
        except Exception as exc:  # a bug must not take the daemon or other clients down
            log.exception("request failed")
            return {"ok": False, "code": "internal", "error": f"internal error: {type(exc).__name__}: {exc}"}

    # ---- operations ------------------------------------------------------------------------

    async def op_ping(self, conn: Connection) -> dict:
        return {"ok": True, "version": __version__, "pid": os.getpid()}

    async def op_status(self, conn: Connection) -> dict:
        return {"ok": True, **self.status()}

    async def op_stop(self, conn: Connection) -> dict:
        self.should_exit.set()
        return {"ok": True, "stopping": True}

    async def op_attach(self, conn: Connection, dataset: str, batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, local_world_size: int = 1, job: str | None = None,
                        options: dict | None = None) -> dict:
        if self.should_exit.is_set():
            raise PrefetchdError("the daemon is shutting down; attach again once it is back", code="stopping")
        if conn.job is not None:
            raise ProtocolError("this connection is already attached; open a new connection per rank")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or local_world_size < 1:
            raise ProtocolError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size; got "
                                f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        opts = resolve_options(options or {}, self.config.tree["defaults"])
        spec = with_channels(parse_dataset(dataset), opts.channels)
        job_spec = JobSpec(
            job=job or _default_job_id(spec, seed, world_size, batch_size, opts),
            dataset=spec.text, seed=seed, world_size=world_size, batch_size=batch_size,
            drop_last=opts.drop_last, cache_size=opts.cache_size, prefetch_factor=opts.prefetch_factor,
            policy=opts.policy, preprocessing=opts.preprocessing, channels=spec.channels,
        )
        the_job = await self._get_or_start_job(job_spec, spec, local_world_size)
        state = the_job.ranks.get(rank)
        if state is not None and state.connected:
            raise PrefetchdError(f"rank {rank} of job {job_spec.job} is already attached by another process; "
                                 "give each process its own rank or a different job id", code="rank_taken")
        state = the_job.add_rank(rank)
        conn.job, conn.rank = the_job, rank
        return {
            "ok": True,
            "job": job_spec.job,
            "layout": the_job.arena.layout.to_dict(),
            "fields": the_job.n_fields,
            "channels": list(spec.channels),
            "batches_per_epoch": the_job.batches_per_epoch,
            "preprocessing": the_job.spec.preprocessing.to_dict(),
            "position": {"epoch": state.epoch, "position": state.position},
        }

    async def _get_or_start_job(self, job_spec: JobSpec, spec: DatasetSpec, local_world_size: int) -> Job:
        existing = self.jobs.get(job_spec.job)
        if existing is None and job_spec.job in self._job_starts:
            existing = await asyncio.shield(self._job_starts[job_spec.job])
        if existing is not None:
            diffs = existing.spec.differences(job_spec)
            if diffs:
                raise PrefetchdError(
                    f"job {job_spec.job} is already attached with different {', '.join(diffs)}; "
                    "use the same settings on every rank or another job id", code="job_mismatch")
            return existing
        future = asyncio.get_running_loop().create_future()
        self._job_starts[job_spec.job] = future
        try:
            index = await self.indexes.get(spec)
            job = Job(job_spec, index, self._store_for(spec), self.pool,
                      max_fills=max(4, int(self.config.get("s3.max_concurrency")) // max(1, len(spec.channels))),
                      local_world_size=local_world_size, **self._shm_settings())
            await job.start()
            self.jobs[job_spec.job] = job
            future.set_result(job)
            log.info("job %s attached: %s, %d fields, %d slots of %s", job_spec.job, spec.text, job.n_fields,
                     job_spec.cache_size, "x".join(map(str, job.arena.layout.shape)))
            return job
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            if "job" in locals() and job.arena is not None:
                await job.close()
            raise
        finally:
            self._job_starts.pop(job_spec.job, None)

    def _shm_settings(self) -> dict:
        group = self.config.get("shm.group")
        gid = grp.getgrnam(group).gr_gid if group else None
        if gid == os.getegid():
            gid = None  # new files already get this group; skip the fchown (SystemCallFilter=~@privileged)
        return {"shm_mode": 0o640 if group else 0o600, "shm_gid": gid,
                "shm_budget": int(self.config.get("shm.budget_bytes"))}

    def _verify_md5(self) -> bool:
        setting = self.config.get("s3.verify_md5")
        if setting == "auto":  # TLS authenticates the bytes already; plain http (a local mirror) does not
            endpoint = resolve_endpoint(self.config.get("s3.endpoint_url"))
            return bool(endpoint) and endpoint.startswith("http://")
        return bool(setting)

    def _store_for(self, spec: DatasetSpec) -> ObjectStore:
        if spec.is_local:
            return LocalStore(spec.root, self.limiter, self.counters)
        store: ObjectStore = S3Store(self.s3client, spec.bucket, self.limiter, self.counters,
                                     retries=int(self.config.get("s3.retries")),
                                     verify_md5=self._verify_md5(),
                                     getter=self.transport.getter(self.s3client, spec.bucket))
        tier = self.config.tree["disk_cache"]
        if tier["dir"] and tier["max_bytes"]:
            namespace = f"{resolve_endpoint(self.config.get('s3.endpoint_url')) or 'aws'}/{spec.bucket}"
            if namespace not in self.disk_tiers:
                self.disk_tiers[namespace] = DiskTier(store, tier["dir"], tier["max_bytes"], namespace)
            store = self.disk_tiers[namespace]
        return store

    async def op_next(self, conn: Connection, epoch: int, batch: int) -> dict:
        job = self._attached(conn)
        if epoch < 0 or batch < 0:
            raise ProtocolError(f"epoch and batch must be >= 0, got epoch={epoch}, batch={batch}")
        return await job.next_batch(conn.rank, epoch, batch)

    async def op_release(self, conn: Connection, slots: list) -> dict:
        job = self._attached(conn)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
            raise ProtocolError("release needs a list of integer slot indices")
        job.release(conn.rank, slots)
        return {"ok": True}

    async def op_detach(self, conn: Connection) -> dict:
        job = self._attached(conn)
        job.disconnect_rank(conn.rank, detach=True)
        conn.job = conn.rank = None
        if job.all_detached:
            await self._close_job(job)
        return {"ok": True}

    def _attached(self, conn: Connection) -> Job:
        if conn.job is None or conn.job.closed:
            raise ProtocolError("attach first: this connection is not attached to a job")
        return conn.job

    async def _close_job(self, job: Job) -> None:
        self.jobs.pop(job.spec.job, None)
        for key in self._stats_closed_jobs:
            self._stats_closed_jobs[key] += getattr(job.stats, key)
        self._quarantined_closed += len(job.quarantined)
        await job.close()
        log.info("job %s closed", job.spec.job)

    async def _reap_idle_jobs(self) -> None:
        timeout = float(self.config.get("job.idle_timeout_s"))
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.idle_since is not None and now - job.idle_since > timeout:
                log.info("job %s has had no client for %.0f s: releasing its arena", job.spec.job, timeout)
                await self._close_job(job)

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        jobs = [job.status() for job in self.jobs.values()]
        totals = dict(self._stats_closed_jobs)
        for j in jobs:
            for key in totals:
                totals[key] += j[key]
        served = totals["fields_served"]
        slots: dict[str, int] = {state.name: 0 for state in SlotState}
        for j in jobs:
            for state, count in j["slots"].items():
                slots[state] = slots.get(state, 0) + count
        c = self.counters
        return {
            "metrics_port": self.metrics_port,
            "version": __version__,
            "pid": os.getpid(),
            "socket": str(self.socket_path),
            "uptime_s": time.monotonic() - self.started,
            "jobs": jobs,
            "fields_served": served,
            "cache_hits": totals["cache_hits"],
            "cache_misses": totals["cache_misses"],
            "hit_rate": totals["cache_hits"] / served if served else 0.0,
            "bytes_fetched": c.bytes_fetched,
            "gets": c.gets,
            "fetch_mb_per_s": c.meter.rate() / 1e6,
            "inflight_requests": c.inflight,
            "retries": c.retries,
            "fetch_errors": c.errors,
            "quarantined": self._quarantined_closed + sum(len(j["quarantined"]) for j in jobs),
            "shm_bytes": sum(j["shm_bytes"] for j in jobs),
            "slots": slots,
            "stall_s": totals["stall_s"],
            "indexing": self.indexes.status(),
            "disk_cache": [tier.status() for tier in self.disk_tiers.values()],
            "concurrency": self._concurrency_status(),
        }

    def _concurrency_status(self) -> dict[str, Any]:
        """The limiter's snapshot; throttles/decreases/increases are cumulative since start."""
        return {**self.limiter.snapshot(), "adaptive": self.limiter.adaptive}


def limiter_bounds(s3: dict[str, Any]) -> tuple[int, int]:
    """(maximum, minimum) GETs in flight for an `s3:` block; `get_concurrency: fixed` pins the limit."""
    maximum = max(1, int(s3["max_concurrency"]))
    return maximum, maximum if s3.get("get_concurrency", "adaptive") == "fixed" else min(DEFAULT_MINIMUM, maximum)


def make_limiter(s3: dict[str, Any]) -> AdaptiveConcurrency:
    """The GET limiter for an `s3:` config block."""
    maximum, minimum = limiter_bounds(s3)
    return AdaptiveConcurrency(maximum, minimum=minimum)


def _reload_from_argv() -> Config:
    """The config as `prefetchd serve` loaded it at startup: the same --config file and --set overrides."""
    from prefetchd.cli import build_parser, load_config

    argv = sys.argv[1:]
    if "serve" in argv:
        argv = argv[argv.index("serve"):]
    return load_config(build_parser().parse_args(argv))


def _diff(path: str, a: Any, b: Any):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(f"{path}.{key}", a.get(key), b.get(key))
    elif a != b:
        yield path, a, b


def _get_path(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node[part] = dict(node[part])  # copy on write: the old Config keeps its own tree
        node = node[part]
    node[parts[-1]] = value


def _default_job_id(spec: DatasetSpec, seed: int, world_size: int, batch_size: int, opts) -> str:
    text = f"{spec.text}|{seed}|{world_size}|{batch_size}|{opts}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


async def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
    writer.write(encode(reply))
    await writer.drain()


def _socket_answers(path: Path) -> bool:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
