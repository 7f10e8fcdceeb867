"""The trainer's side: attach to the daemon and read batches as zero-copy views of its arena.

    stream = attach(dataset=..., batch_size=32, seed=0, rank=rank, world_size=world_size)
    for batch in stream.epoch(epoch):
        batch.ids      # field ids, "<plate folder>/<well>/<site>"
        batch.images   # numpy uint16 [B, C, H, W], read-only, valid until the next batch
        batch.pixel_size_um  # float32 [B]: µm per pixel of each field's microscope (NaN: unknown)
    stream.close()

No network I/O happens here: the daemon has fetched and decoded everything already.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from prefetchd.control import ControlConnection
from prefetchd.errors import AttachConflict, DaemonNotRunning, DaemonStopping, ErrorCode, IndexBuilding
from prefetchd.job_id import ENV_JOB, job_id_for
from prefetchd.local_root import absolute_local_root, unseen_local_root_hint
from prefetchd.shm.arena import ArenaLayout
from prefetchd.shm.batch_view import BatchView


log = logging.getLogger(__name__)

RECONNECT_TIMEOUT_S = float(os.environ.get("PREFETCHD_RECONNECT_TIMEOUT_S", "300"))


@dataclass
class Batch:
    epoch: int
    index: int
    ids: list[str]
    images: np.ndarray
    slots: list[int]
    waited_s: float
    pixel_size_um: np.ndarray | None = None   # float32 [B], NaN where the source's microscope is unknown


class Stream:
    """One rank's connection to one job. Iterate `epoch(e)`; `close()` when done."""

    def __init__(self, conn: ControlConnection, reply: dict[str, Any], batch_size: int, rank: int, world_size: int,
                 attach_request: dict[str, Any] | None = None, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
                 timeout: float | None = None):
        self._conn = conn
        self._timeout = timeout
        self._attach_request = attach_request
        self.reconnect_timeout_s = reconnect_timeout_s
        self.reconnects = 0
        self.job: str = reply["job"]
        self.layout = ArenaLayout.from_dict(reply["layout"])
        self.fields: int = reply["fields"]
        self.channels: list[str] = reply["channels"]
        self.batches_per_epoch: int = reply["batches_per_epoch"]
        # What the daemon applied; `clahe.where == "trainer"` means CLAHE is left to the consumer's device.
        self.preprocessing: dict[str, Any] = reply.get("preprocessing", {})
        # The slots' (H, W), how fields of other sizes were made that size, what each source's fields are.
        self.field_shape: dict[str, Any] | None = reply.get("field_shape")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._view = BatchView(self.layout, batch_size)
        self.closed = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layout.shape

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from `start_batch` on (resume skips what was consumed, with no fetch)."""
        for index in range(start_batch, self.batches_per_epoch):
            yield self.next(epoch, index)

    def next(self, epoch: int, index: int) -> Batch:
        self._ensure_connected()
        try:
            reply = self._conn.request("next", epoch=epoch, batch=index)
        except (DaemonNotRunning, DaemonStopping):   # the daemon went away
            if self._attach_request is None or self.reconnect_timeout_s <= 0:
                raise
            self._reattach()
            reply = self._conn.request("next", epoch=epoch, batch=index)
        if reply.get("end"):
            raise IndexError(f"epoch {epoch} has {reply['batches']} batches for this rank; asked for {index}")
        images = self._view.images(reply["slots"])
        pixel = reply.get("pixel_size_um")
        pixel_size = np.array([np.nan if v is None else v for v in pixel], np.float32) if pixel else None
        return Batch(epoch, index, reply["ids"], images, reply["slots"], reply.get("waited_s", 0.0), pixel_size)

    def _ensure_connected(self) -> None:
        """A request that timed out broke its connection (a late reply would answer the wrong request):
        the next call attaches again on a new one and resumes where the rank was."""
        if self._conn.broken and self._attach_request is not None:
            self._reattach()

    def _reattach(self) -> None:
        """The daemon went away (restart, crash) or timed out: wait for it, attach again, keep our place.

        Batches are requested by (epoch, index), so the retried request returns exactly the batch that was
        interrupted: nothing is lost or duplicated. While the daemon stays unresponsive each attempt ends
        with `DaemonTimeout` after the stream's `timeout`, as any call would.
        """
        socket_path, timed_out = self._conn.path, self._conn.timed_out
        self._conn.close()
        self._conn.broken = self._conn.broken or f"the connection to {socket_path} was lost"
        self._view.close()
        deadline = time.monotonic() + self.reconnect_timeout_s
        if timed_out:
            log.warning("reconnecting to the prefetchd daemon at %s after a timeout", socket_path)
        else:
            log.warning("prefetchd daemon at %s went away; waiting up to %.0f s for it to come back",
                        socket_path, self.reconnect_timeout_s)
        while True:
            try:
                conn = ControlConnection(socket_path, timeout=self._timeout)
                try:
                    reply = conn.request("attach", **self._attach_request)
                except BaseException:
                    conn.close()
                    raise
                break
            except (DaemonNotRunning, DaemonStopping, IndexBuilding, AttachConflict) as exc:
                if isinstance(exc, AttachConflict) and exc.code != ErrorCode.RANK_TAKEN:
                    raise  # rank_taken only: the daemon has not yet seen our previous connection close
                if time.monotonic() > deadline:
                    raise DaemonNotRunning(
                        f"the prefetchd daemon at {socket_path} did not come back within "
                        f"{self.reconnect_timeout_s:.0f} s; restart it (systemctl restart prefetchd) and resume "
                        "from the last checkpoint") from None
                time.sleep(0.2)  # polling for the socket to reappear, bounded by the deadline
        self._conn = conn
        self.field_shape = reply.get("field_shape")
        self.layout = ArenaLayout.from_dict(reply["layout"])
        self._view = BatchView(self.layout, self.batch_size)
        self.reconnects += 1
        log.warning("reattached to prefetchd job %s", self.job)

    def status(self) -> dict[str, Any]:
        self._ensure_connected()
        return self._conn.request("status")

    def get_state(self) -> dict[str, Any]:
        return {"job": self.job, "rank": self.rank, "world_size": self.world_size}

    def close(self) -> None:
        """Detach: leases are returned and the view unmapped. Never unlinks shared memory."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self._conn.broken:
                self._conn.request("detach")
        except Exception:
            pass  # the daemon may already be gone; it reclaims leases on disconnect anyway
        self._view.close()
        self._conn.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()


def attach(
    dataset: str | list[str],
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    socket: str | os.PathLike | None = None,
    job: str | None = None,
    local_world_size: int | None = None,
    timeout: float | None = None,
    reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
    **options: Any,
) -> Stream:
    """Attach one rank to the daemon. `options`: channels, illum, rescale, clahe, cache_size,
    prefetch_factor, policy, drop_last, shape (see README). All ranks of a job must pass the same values.
    `dataset` may be a list of dataset strings of one bucket (a config list): their prefixes are joined.
    `job`: the job id (default `$PREFETCHD_JOB`, else from the launcher: `prefetchd/job_id.py`)."""
    if isinstance(dataset, (list, tuple)):
        from prefetchd.dataset import join_datasets

        dataset = join_datasets(list(dataset))
    options = {k: v for k, v in options.items() if v is not None}
    dataset = absolute_local_root(dataset)
    if job is None:
        job = os.environ.get(ENV_JOB) or job_id_for(dataset, batch_size, seed, world_size, options)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    request = dict(dataset=dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                   local_world_size=local_world_size, job=job, options=options)
    conn = ControlConnection(socket, timeout=timeout)
    try:
        reply = conn.request("attach", **request)
    except BaseException as exc:
        conn.close()
        hint = unseen_local_root_hint(dataset) if getattr(exc, "code", None) == ErrorCode.NO_ROOT else None
        if hint:
            raise type(exc)(hint, code=exc.code) from None
        raise
    return Stream(conn, reply, batch_size, rank, world_size, request, reconnect_timeout_s, timeout)

