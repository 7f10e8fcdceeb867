"""The daemon's indexes: each dataset (location + endpoint) is built or loaded once and shared by jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from prefetchd.dataset import DatasetSpec
from prefetchd.errors import IndexBuilding
from prefetchd.index import Index, build_index
from prefetchd.s3 import resolve_endpoint

log = logging.getLogger("prefetchd")


class IndexRegistry:
    def __init__(self, s3cfg: dict[str, Any], cache_dir: Path, wait_s: float):
        self.s3cfg = s3cfg
        self.cache_dir = cache_dir
        self.wait_s = wait_s
        self._builds: dict[tuple, asyncio.Future] = {}
        self.progress: dict[str, dict[str, Any]] = {}

    async def get(self, spec: DatasetSpec) -> Index:
        key = (spec, resolve_endpoint(self.s3cfg.get("endpoint_url")))
        future = self._builds.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.ensure_future(self._build(spec))
            self._builds[key] = future
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.wait_s)
        except asyncio.TimeoutError:
            raise IndexBuilding(
                f"the index of {spec.text} is still building after {self.wait_s:.0f} s; attach again later "
                "(see `prefetchd status`) or raise index.wait_s") from None

    async def _build(self, spec: DatasetSpec) -> Index:
        name = spec.text
        self.progress[name] = {"started": time.time(), "plates_done": 0, "plates_total": None, "keys": 0}

        def report(done: int, total: int | None, keys: int) -> None:
            self.progress[name].update(plates_done=done, plates_total=total, keys=keys)

        log.info("indexing %s (from the index cache if it has it)", name)
        try:
            index = await build_index(spec, self.s3cfg, self.cache_dir, progress=report)
        except Exception as exc:
            log.warning("indexing %s failed: %s", name, getattr(exc, "message", exc))
            raise
        finally:
            self.progress.pop(name, None)
        log.info("indexed %s: %d fields in %.1f s%s", name, len(index.fields), index.seconds,
                 " (from the index cache)" if index.from_cache else "")
        return index

    def status(self) -> dict[str, Any]:
        return {name: dict(p) for name, p in self.progress.items()}


def with_channels(spec: DatasetSpec, channels: tuple[str, ...] | None) -> DatasetSpec:
    return spec if not channels else dataclasses.replace(spec, channels=channels)
