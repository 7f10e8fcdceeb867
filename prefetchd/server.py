"""The daemon: startup → serve the control socket → graceful shutdown (uvicorn's shape).

SIGTERM/SIGINT (or a `stop` request) drain: new requests are refused, waiting `next` calls get a
`stopping` error, arenas are unlinked, the socket file is removed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import reprlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from prefetchd import __version__
from prefetchd.config import Config, apply_reload
from prefetchd.connections import Admission, Connection, IdleConnection, read_request, until_peer_leaves
from prefetchd.errors import (AttachConflict, ConfigError, DaemonStopping, ErrorCode, Forbidden, PrefetchdError,
                              ProtocolError, TooManyConnections)
from prefetchd.illum import IllumStore
from prefetchd.indexes import IndexRegistry
from prefetchd.job import EpochEnd, Job
from prefetchd.jobs import Jobs, job_spec_for
from prefetchd.listen import ControlSocket
from prefetchd.notify import sd_notify, watchdog_interval_s
from prefetchd.options import MAX_EPOCH, check_attach_sizes
from prefetchd.peercred import PeerPolicy, peer_credentials
from prefetchd.protocol import (MAX_LINE, attach_reply, batch_reply, decode_request, encode, end_of_epoch_reply,
                                error_reply, internal_error_reply, ok_reply)
from prefetchd.shm.arena import reap_stale_segments
from prefetchd.stores import Stores

log = logging.getLogger("prefetchd")


class Server:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None):
        self.config = config
        self._reload = reload or (lambda: self.config.reread())
        self.peers = PeerPolicy.from_config(config)
        self._metrics_server: asyncio.AbstractServer | None = None
        self.metrics_port: int | None = None
        self.socket_path = config.socket_path
        self.started = time.monotonic()
        self.should_exit = asyncio.Event()
        self._connections: set[asyncio.Task] = set()
        self._holders: dict[tuple[str, int], Connection] = {}   # (job, rank) -> the connection attached as it
        self.admission = Admission(int(config.get("control.max_connections")),
                                   int(config.get("control.max_connections_per_peer")))
        self._stack = contextlib.AsyncExitStack()
        self.control = ControlSocket(self.socket_path, self._handle, config.get("shm.group"))
        self.stores = Stores(config.tree["s3"], config.tree["disk_cache"])
        self.pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self.indexes = IndexRegistry(config.tree["s3"], config.cache_dir, float(config.get("index.wait_s")))
        self.illum = IllumStore(self.pool, int(config.get("illum.budget_bytes")))   # one for all jobs
        self.jobs = Jobs(self.indexes, self.stores, self.pool, self.illum)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        self._install_signal_handlers()
        try:
            await self.startup()
        except BaseException:
            self.control.close()
            self.control.release()
            raise
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        reaped = reap_stale_segments()
        if reaped:
            log.warning("removed %d shared-memory segment(s) left by a dead daemon: %s", len(reaped), ", ".join(reaped))
        await self.stores.open(self._stack)
        await self.control.bind()
        await self._start_metrics()
        endpoint = self.stores.endpoint or "AWS S3"
        log.info("prefetchd %s listening on %s (S3 endpoint: %s, GETs: %s, decode workers: %d)",
                 __version__, self.socket_path, endpoint, self.stores.transport.name, self.config.decode_workers)
        sd_notify("READY=1\nSTATUS=listening on " + str(self.socket_path))

    async def _start_metrics(self) -> None:
        port = int(self.config.get("metrics.port"))
        if not port:
            return
        from prefetchd.metrics import start_metrics_server

        host = self.config.get("metrics.address") or "127.0.0.1"
        try:
            self._metrics_server = await start_metrics_server(self.status, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                              "pick another metrics.port or 0 to turn metrics off") from None
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
            await self.jobs.reap_idle(float(self.config.get("job.idle_timeout_s")))
            await self.control.keep_bound()

    async def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("shutting down: %d job(s), %d connection(s)", len(self.jobs), len(self._connections))
        self.control.close()   # no new connections; the socket file goes if it is still ours
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.jobs.close_all()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.jobs.close_all()  # registered while the first jobs were closing
        if self.control.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.control.server.wait_closed(), 5)
        self.control.release()
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
        if float(self.config.get("debug.block_loop_on_sigusr2_s")) > 0:
            loop.add_signal_handler(signal.SIGUSR2, self._block_loop)

    def _block_loop(self) -> None:
        """Tests only (debug.block_loop_on_sigusr2_s): hang the event loop the way a bug would, so the
        watchdog's pings stop and the supervisor (systemd) restarts the daemon."""
        seconds = float(self.config.get("debug.block_loop_on_sigusr2_s"))
        log.warning("SIGUSR2: blocking the event loop for %g s (debug.block_loop_on_sigusr2_s)", seconds)
        time.sleep(seconds)

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
        result = apply_reload(self.config, fresh)
        self.config = result.config
        logging.getLogger().setLevel(str(self.config.get("log_level")).upper())
        self.indexes.wait_s = float(self.config.get("index.wait_s"))
        self.stores.reload(self.config.tree["s3"])  # one limiter: all jobs together, attached or new
        self.illum.budget_bytes = int(self.config.get("illum.budget_bytes"))
        self.peers = PeerPolicy.from_config(self.config)
        self.admission.total = int(self.config.get("control.max_connections"))
        self.admission.per_peer = int(self.config.get("control.max_connections_per_peer"))
        log.info("reloaded config: changed %s", ", ".join(result.changed) or "nothing")
        if result.ignored:
            log.warning("reload: %s changed but need a restart (`systemctl restart prefetchd`); kept the running values",
                        ", ".join(result.ignored))
        sd_notify("READY=1")

    # ---- connections -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        conn = Connection(cred=peer_credentials(sock), sock=sock, task=task)
        refusal = self.peers.check(conn.cred)
        if refusal is not None:
            log.warning("refused control connection from %s: %s", conn.cred or "unknown peer", refusal)
            await _refuse(reader, writer, Forbidden(refusal))
            return
        refusal = self.admission.admit(conn)
        if refusal is not None:
            log_now, unlogged = self.admission.should_log(conn)
            if log_now:
                more = f" (and {unlogged} more since the last such line)" if unlogged else ""
                log.warning("refused control connection from %s: %s%s", conn.peer, refusal, more)
            await _refuse(reader, writer, TooManyConnections(refusal))
            return
        self._connections.add(task)
        pending = b""
        try:
            while not self.should_exit.is_set():
                try:
                    line = await read_request(reader, conn, pending, float(self.config.get("control.idle_timeout_s")))
                except (ValueError, asyncio.LimitOverrunError):
                    log.warning("refused a request from %s: longer than %d bytes (whatever it asked, attach "
                                "included, was not read); closed the connection", conn.peer, MAX_LINE)
                    await _reply(writer, error_reply(ProtocolError(f"request longer than {MAX_LINE} bytes")))
                    break
                except IdleConnection:
                    log.info("closed a control connection from %s: no request for %.0f s (control.idle_timeout_s)",
                             conn.peer, float(self.config.get("control.idle_timeout_s")))
                    break
                if not line:
                    break
                reply, pending = await self._serve_request(line, conn, reader)
                if reply is None:
                    log.info("%s left while rank %s of job %s waited for a batch; the rank is free", conn.peer,
                             conn.rank, conn.job.spec.job if conn.job else "?")
                    break
                await _reply(writer, reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug in serving one connection must not reach the event loop's handler
            log.exception("control connection from %s failed", conn.peer)
        finally:
            self._connections.discard(task)
            self.admission.leave(conn)
            self._let_go(conn)
            writer.close()

    async def _serve_request(self, line: bytes, conn: Connection, reader: asyncio.StreamReader) \
            -> tuple[dict | None, bytes]:
        """(reply, bytes read ahead); the reply is None if the peer left while a `next` waited for its batch."""
        try:
            request = decode_request(line)
        except PrefetchdError as exc:
            fields = _fields_of(line)
            if fields.get("op") == "attach":  # refused by the schema: still one log line per failed attach
                _log_refused_attach(exc, fields, conn)
            return error_reply(exc), b""
        if request["op"] == "next":  # may wait long for a fill: notice if the rank's process goes away
            return await until_peer_leaves(reader, self._dispatch(request, conn))
        return await self._dispatch(request, conn), b""

    async def _dispatch(self, request: dict, conn: Connection) -> dict:
        op = request.pop("op")
        try:
            return await getattr(self, "op_" + op)(conn, **request)
        except PrefetchdError as exc:
            if op == "attach":
                _log_refused_attach(exc, request, conn)
            return error_reply(exc)
        except Exception as exc:  # a bug must not take the daemon or other clients down
            log.exception("%s request failed", op)
            return internal_error_reply(exc)

    def _let_go(self, conn: Connection) -> None:
        """The connection is over: its rank (if it still holds one) is free for whoever attaches it next."""
        if conn.job is not None and conn.rank is not None:
            if self._holders.get((conn.job.spec.job, conn.rank)) is conn:
                del self._holders[(conn.job.spec.job, conn.rank)]
                conn.job.disconnect_rank(conn.rank)
        conn.job = conn.rank = None

    # ---- operations ------------------------------------------------------------------------

    async def op_ping(self, conn: Connection) -> dict:
        return ok_reply(version=__version__, pid=os.getpid())

    async def op_status(self, conn: Connection) -> dict:
        return ok_reply(**self.status())

    async def op_stop(self, conn: Connection) -> dict:
        self.should_exit.set()
        return ok_reply(stopping=True)

    async def op_attach(self, conn: Connection, dataset: str, batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, local_world_size: int = 1, job: str | None = None,
                        options: dict | None = None) -> dict:
        if self.should_exit.is_set():
            raise DaemonStopping("the daemon is shutting down; attach again once it is back")
        if conn.job is not None:
            raise ProtocolError("this connection is already attached; open a new connection per rank")
        check_attach_sizes(batch_size, rank, world_size, local_world_size)  # before anything is sized from them
        job_spec, spec = job_spec_for(dataset, batch_size, seed, world_size, job, options or {},
                                      self.config.tree["defaults"])
        the_job = await self.jobs.join(job_spec, spec, local_world_size, self.config)
        previous = the_job.ranks.get(rank)
        await the_job.orders_ready(rank, previous.epoch if previous is not None else 0)
        holder = self._holders.get((job_spec.job, rank))
        if holder is not None and holder.peer_gone():
            # Its process died (a trainer restarted at once) and the event that says so is still queued.
            log.info("rank %d of job %s: %s is gone, %s takes the rank over", rank, job_spec.job, holder.peer, conn.peer)
            self._let_go(holder)
            if holder.task is not None:
                holder.task.cancel()  # whatever it was waiting for, nobody reads the reply
        state = the_job.ranks.get(rank)
        if state is not None and state.connected:
            raise AttachConflict(f"rank {rank} of job {job_spec.job} is already attached by another process; "
                                 "give each process its own rank or a different job id", code=ErrorCode.RANK_TAKEN)
        state = the_job.add_rank(rank)
        conn.job, conn.rank = the_job, rank
        self._holders[(job_spec.job, rank)] = conn
        return attach_reply(job=job_spec.job, layout=the_job.arena.layout.to_dict(), fields=the_job.n_fields,
                            channels=list(spec.channels), batches_per_epoch=the_job.batches_per_epoch,
                            preprocessing=the_job.spec.preprocessing.to_dict(), epoch=state.epoch,
                            position=state.position, field_shape=the_job.field_shape_info())

    async def op_next(self, conn: Connection, epoch: int, batch: int) -> dict:
        job = self._attached(conn)
        if epoch < 0 or batch < 0:
            raise ProtocolError(f"epoch and batch must be >= 0, got epoch={epoch}, batch={batch}")
        if epoch > MAX_EPOCH:
            raise ProtocolError(f"epoch must be an integer >= 0 and <= {MAX_EPOCH}, got {epoch}")
        served = await job.next_batch(conn.rank, epoch, batch)
        if isinstance(served, EpochEnd):
            return end_of_epoch_reply(epoch=served.epoch, batches=served.batches)
        return batch_reply(**dataclasses.asdict(served))

    async def op_release(self, conn: Connection, slots: list) -> dict:
        job = self._attached(conn)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
            raise ProtocolError("release needs a list of integer slot indices")
        job.release(conn.rank, slots)
        return ok_reply()

    async def op_detach(self, conn: Connection) -> dict:
        job = self._attached(conn)
        job.disconnect_rank(conn.rank, detach=True)
        self._holders.pop((job.spec.job, conn.rank), None)
        conn.job = conn.rank = None
        if job.all_detached:
            await self.jobs.close(job)
        return ok_reply()

    def _attached(self, conn: Connection) -> Job:
        if conn.job is None or conn.job.closed:
            raise ProtocolError("attach first: this connection is not attached to a job")
        return conn.job

    # ---- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        jobs, totals = self.jobs.status()
        served = totals["fields_served"]
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
            **self.stores.status(),
            "quarantined": totals["quarantined"],
            "shm_bytes": totals["shm_bytes"],
            "slots": totals["slots"],
            "stall_s": totals["stall_s"],
            "connections": self.admission.count,
            "connections_refused": self.admission.refused,
            "illum": self.illum.status(),
            **self.jobs.shared.status(),
            "indexing": self.indexes.status(),
            "disk_cache": self.stores.disk_status(),
            "concurrency": self.stores.concurrency_status(),
        }


def _log_refused_attach(exc: PrefetchdError, request: dict, conn: Connection) -> None:
    log.warning("attach refused (%s) for rank %s of job %s from %s: %s", exc.code, _short(request.get("rank", 0)),
                _short(request.get("job") or "(default id)"), conn.peer, exc.message)


def _fields_of(line: bytes) -> dict:
    """The fields of a request line that did not pass `decode_request`, as far as they can be read."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or a number too long to read: the op may still show
        return {"op": "attach"} if _ATTACH_OP.search(line) else {}
    return request if isinstance(request, dict) else {}


_ATTACH_OP = re.compile(rb'"op"\s*:\s*"attach"')


def _short(value: Any) -> str:
    """A value from a request as it goes into a log line: one line, bounded (the request may be hostile)."""
    text = _LOGGED.repr(value)
    return text[1:-1] if isinstance(value, str) else text


_LOGGED = reprlib.Repr()
_LOGGED.maxstring = _LOGGED.maxother = 200


async def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
    writer.write(encode(reply))
    await writer.drain()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: PrefetchdError) -> None:
    """One error reply, then close: the peer is not admitted."""
    try:
        await _reply(writer, error_reply(error))
        # Consume the peer's first request (bounded) so closing does not reset the reply away.
        with contextlib.suppress(asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
            await asyncio.wait_for(reader.readline(), 2.0)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
