"""The daemon's jobs by id: started once (ranks attaching at the same time wait for the first start), joined by
every rank with the same settings, closed when all ranks detach or after an idle timeout. Counters of closed
jobs carry on, so status totals are cumulative since start."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import Executor
from typing import Any

from prefetchd.config import Config
from prefetchd.dataset import DatasetSpec, parse_dataset
from prefetchd.errors import AttachConflict
from prefetchd.illum import IllumStore
from prefetchd.indexes import IndexRegistry, with_channels
from prefetchd.job import Job
from prefetchd.options import JobSpec
from prefetchd.options import AttachOptions, resolve_options
from prefetchd.reachability import check_endpoint_answers
from prefetchd.shared_fields import SharedFields
from prefetchd.shm.arena import SlotState
from prefetchd.stores import Stores

log = logging.getLogger("prefetchd")

TOTALS = ("fields_served", "cache_hits", "cache_misses", "stall_s")   # summed over running and closed jobs


class Jobs:
    """Also what jobs share: the illumination store and the registry of fields held in any job's arena."""

    def __init__(self, indexes: IndexRegistry, stores: Stores, pool: Executor, illum: IllumStore):
        self.indexes = indexes
        self.stores = stores
        self.pool = pool
        self.illum = illum
        self.shared = SharedFields()
        self.running: dict[str, Job] = {}
        self._starts: dict[str, asyncio.Future] = {}
        self._closed_totals: dict[str, Any] = {"fields_served": 0, "cache_hits": 0, "cache_misses": 0, "stall_s": 0.0}
        self._closed_quarantined = 0

    def __len__(self) -> int:
        return len(self.running)

    async def join(self, job_spec: JobSpec, spec: DatasetSpec, local_world_size: int, config: Config) -> Job:
        """The running job `job_spec.job`, started now if it is not (index, store, arena, prefetcher)."""
        existing = self.running.get(job_spec.job)
        if existing is None and job_spec.job in self._starts:
            existing = await asyncio.shield(self._starts[job_spec.job])
        if existing is not None:
            diffs = existing.spec.differences(job_spec)
            if diffs:
                raise AttachConflict(
                    f"job {job_spec.job} is already attached with different {', '.join(diffs)}; "
                    "use the same settings on every rank or another job id")
            return existing
        future = asyncio.get_running_loop().create_future()
        self._starts[job_spec.job] = future
        job = None
        try:
            await check_endpoint_answers(spec, self.indexes.s3cfg)
            index = await self.indexes.get(spec)
            job = Job(job_spec, index, self.stores.for_dataset(spec), self.pool,
                      max_fills=max(4, int(config.get("s3.max_concurrency")) // max(1, len(spec.channels))),
                      local_world_size=local_world_size, illum=self.illum, shared=self.shared,
                      key_space=spec.storage.key_space(self.stores.endpoint),
                      field_budget_s=float(config.get("job.field_budget_s")), **_shm_settings(config))
            await job.start()
            self.running[job_spec.job] = job
            future.set_result(job)
            log.info("job %s attached: %s, %d fields, %d slots of %s", job_spec.job, spec.text, job.n_fields,
                     job_spec.cache_size, "x".join(map(str, job.arena.layout.shape)))
            return job
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            if job is not None and job.arena is not None:
                await job.close()
            raise
        finally:
            self._starts.pop(job_spec.job, None)

    async def close(self, job: Job) -> None:
        self.running.pop(job.spec.job, None)
        for key in TOTALS:
            self._closed_totals[key] += getattr(job.stats, key)
        self._closed_quarantined += len(job.quarantine)
        await job.close()
        log.info("job %s closed", job.spec.job)

    async def close_all(self) -> None:
        for job in list(self.running.values()):
            await self.close(job)

    async def reap_idle(self, timeout: float) -> None:
        now = time.monotonic()
        for job in list(self.running.values()):
            if job.idle_since is not None and now - job.idle_since > timeout:
                log.info("job %s has had no client for %.0f s: releasing its arena", job.spec.job, timeout)
                await self.close(job)

    def status(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(per-job status, totals: fields served, hits, misses, stall and quarantined since start; shared
        memory and slots per state now)."""
        jobs = [job.status() for job in self.running.values()]
        totals = dict(self._closed_totals)
        slots: dict[str, int] = {state.name: 0 for state in SlotState}
        for j in jobs:
            for key in TOTALS:
                totals[key] += j[key]
            for state, count in j["slots"].items():
                slots[state] = slots.get(state, 0) + count
        totals["quarantined"] = self._closed_quarantined + sum(len(j["quarantined"]) for j in jobs)
        totals["shm_bytes"] = sum(j["shm_bytes"] for j in jobs)
        totals["slots"] = slots
        return jobs, totals


def job_spec_for(dataset: str, batch_size: int, seed: int, world_size: int, job: str | None, options: dict,
                 defaults: dict) -> tuple[JobSpec, DatasetSpec]:
    """The job an attach request asks for (options over the daemon's `defaults:`), and its dataset."""
    opts = resolve_options(options, defaults)
    spec = with_channels(parse_dataset(dataset), opts.channels)
    job_spec = JobSpec(
        job=job or _default_job_id(spec, seed, world_size, batch_size, opts),
        dataset=spec.text, seed=seed, world_size=world_size, batch_size=batch_size,
        drop_last=opts.drop_last, cache_size=opts.cache_size, prefetch_factor=opts.prefetch_factor,
        policy=opts.policy, preprocessing=opts.preprocessing, channels=spec.channels, shape=opts.shape,
    )
    return job_spec, spec


def _default_job_id(spec: DatasetSpec, seed: int, world_size: int, batch_size: int, opts: AttachOptions) -> str:
    """A request that names no job (a raw protocol client; `prefetchd.client` always sends one).

    A single process is a job of its own, as in the client's rule (`job_id.py`), so two such runs side by side
    never collide; the ranks of a larger world can only be told together by their arguments."""
    if world_size == 1:
        return uuid.uuid4().hex[:12]
    text = f"{spec.text}|{seed}|{world_size}|{batch_size}|{opts}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _shm_settings(config: Config) -> dict:
    group = config.get("shm.group")
    gid = grp.getgrnam(group).gr_gid if group else None
    if gid == os.getegid():
        gid = None  # new files already get this group; skip the fchown (SystemCallFilter=~@privileged)
    return {"shm_mode": 0o640 if group else 0o600, "shm_gid": gid, "shm_budget": int(config.get("shm.budget_bytes"))}
