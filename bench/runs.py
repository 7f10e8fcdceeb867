"""One system run, inside its own `python -m bench.compare --run-one JOB` subprocess: the baseline DataLoader
designs, prefetchd (daemon + attach), or the real trainer (bench/trainer_consumer.py) as the consumer."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.accounting import proc_cpu, proxy_delta, proxy_stats, tree_cpu


def run_one(job: dict) -> dict:
    system = job["system"]
    if job.get("consumer") == "trainer":
        from bench.trainer_consumer import run_trainer

        return run_trainer(job)
    if system.startswith("prefetchd"):
        return run_prefetchd(job)
    return run_baseline(job)


def _epoch_row(epoch: int, res, cpu_s: float, gets: int, nbytes: int, hits: int, proxy: dict) -> dict:
    row = {"epoch": epoch, **res.to_dict(), "cpu_s": cpu_s, "gets": gets, "bytes": nbytes,
           "hit_rate": hits / res.fields if res.fields else 0.0,
           "proxy_requests": proxy.get("requests", 0), "proxy_bytes": proxy.get("bytes_down", 0)}
    row["timeline"] = [(round(t, 4), round(w, 4), n) for t, w, n in res.timeline]
    return row


def run_baseline(job: dict) -> dict:
    import torch

    from bench.baselines.jump_guide import JumpGuideDataset, S3TorchFieldDataset, make_loader
    from bench.consumer import consume

    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 cores is the point
    torch.set_num_threads(1)
    fields = [tuple(f) for f in job["fields"]]
    out: dict[str, Any] = {"system": job["system"], "epochs": []}
    # Cold index for the baseline = a paginated LIST of the prefix grouped into fields; warm = keys given.
    t0 = time.perf_counter()
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    client = boto3.session.Session().client("s3", endpoint_url=job["endpoint"], region_name="us-east-1",
                                            config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=job["bucket"],
                                                                                      Prefix=job["prefix"])
            for o in page.get("Contents", [])]
    out["list_s"] = time.perf_counter() - t0
    out["listed_keys"] = len(keys)
    if job["system"] == "s3torch-u16":
        dataset = S3TorchFieldDataset(fields, job["bucket"], job["endpoint"])
    else:
        dataset = JumpGuideDataset(fields, job["bucket"], job["endpoint"],
                                   mode="guide" if job["system"] == "baseline-guide" else "u16")
    loader = make_loader(dataset, job["batch_size"], seed=job["seed"], epoch=0)
    stage = np.zeros(8)
    me = os.getpid()
    px = proxy_stats(job["proxy_stats"])
    for epoch in range(job["epochs"]):
        acc = np.zeros(8)
        img_hits = [0]

        def on_batch(batch):
            a = batch["acct"].numpy()
            acc[:] += a.sum(axis=0)
            img_hits[0] += int((a[:, 6] >= len(fields[0][1]) - 1e-9).sum())

        cpu0 = tree_cpu(me)
        res = consume(loader, demand=job.get("demand"), on_batch=on_batch)
        cpu1 = tree_cpu(me)
        delta, px = proxy_delta(job["proxy_stats"], px)
        row = _epoch_row(epoch, res, cpu1 - cpu0, int(acc[4]), int(acc[5]), img_hits[0], delta)
        row["stage_cpu_s"] = dict(zip(("fetch", "decode", "clahe", "stack"), acc[:4].tolist()))
        out["epochs"].append(row)
        stage += acc
        if epoch == 0:
            out["ttfb_warm_s"] = res.first_batch_s      # keys known: worker start + first batch
            out["ttfb_cold_s"] = res.first_batch_s + out["list_s"]
    out["stage_cpu_s"] = dict(zip(("fetch", "decode", "clahe", "stack"), stage[:4].tolist()))
    del loader
    return out


def prefetchd_options(system: str) -> dict:
    if system == "prefetchd-opencv":
        return {"illum": False, "rescale": False, "clahe": {"clip_limit": 3.0, "tile_grid": 8, "bins": 65536}}
    return {}


def run_prefetchd(job: dict) -> dict:
    from bench.consumer import consume
    from prefetchd.client import attach
    from prefetchd.dev.daemon_process import DaemonProcess

    work = Path(job["workdir"])
    cache_dir = work / f"index-{job['system']}-{job['regime']}-{os.getpid()}"
    sock = Path(tempfile.mkdtemp(prefix="pfb-", dir=work)) / "d.sock"
    overrides = [f"s3.endpoint_url={job['endpoint']}", f"cache_dir={cache_dir}", "log_level=warning"]
    overrides += job.get("overrides", [])
    dataset = f"JUMPS3MultiView:bucket={job['bucket']}:prefix={job['prefix']}"
    opts = dict(prefetchd_options(job["system"]), cache_size=job["cache_size"], prefetch_factor=2,
                policy=job.get("policy"))  # None: the daemon's default
    out: dict[str, Any] = {"system": job["system"], "epochs": [], "options": opts}
    me = os.getpid()
    log = work / f"daemon-{job['system']}-{job['regime']}.log"
    daemon = DaemonProcess(sock, overrides, log_path=log)
    t0 = time.perf_counter()
    daemon.start()
    out["daemon_start_s"] = time.perf_counter() - t0
    profiler = None
    try:
        t0 = time.perf_counter()
        stream = attach(dataset=dataset, batch_size=job["batch_size"], seed=job["seed"], socket=sock, **opts)
        out["attach_s"] = time.perf_counter() - t0
        if job.get("profile") and shutil.which("py-spy"):
            prof_path = work / f"pyspy-{job['system']}-{job['regime']}.txt"
            profiler = subprocess.Popen(["py-spy", "record", "--pid", str(daemon.proc.pid), "--rate", "97",
                                         "--format", "raw", "--nonblocking", "--threads", "-o", str(prof_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out["profile_path"] = str(prof_path)
        px = proxy_stats(job["proxy_stats"])
        for epoch in range(job["epochs"]):
            before = stream.status()
            cpu0, dcpu0 = tree_cpu(me), proc_cpu(daemon.proc.pid)
            res = consume(stream.epoch(epoch), demand=job.get("demand"))
            cpu1, dcpu1 = tree_cpu(me), proc_cpu(daemon.proc.pid)
            after = stream.status()
            delta, px = proxy_delta(job["proxy_stats"], px)
            jstat = next(j for j in after["jobs"] if j["job"] == stream.job)
            ep = jstat["epochs"].get(str(epoch), {})
            row = _epoch_row(epoch, res, cpu1 - cpu0, after["gets"] - before["gets"],
                             after["bytes_fetched"] - before["bytes_fetched"], ep.get("hits", 0), delta)
            row["daemon_cpu_s"] = dcpu1 - dcpu0
            row["fields_fetched"] = (jstat["fields_fetched"] -
                                     next(j for j in before["jobs"] if j["job"] == stream.job)["fields_fetched"])
            if epoch == 0:
                out["ttfb_cold_s"] = out["attach_s"] + res.first_batch_s
            out["epochs"].append(row)
        out["shm_bytes"] = after["shm_bytes"]
        stream.close()
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(20)
            profiler = None
        daemon.stop()
        # Warm index: a fresh daemon on the same index cache dir, a new job, time to its first batch.
        if job.get("warm", True):
            daemon = DaemonProcess(sock, overrides, log_path=log)
            daemon.start()
            t0 = time.perf_counter()
            stream = attach(dataset=dataset, batch_size=job["batch_size"], seed=job["seed"] + 1, socket=sock, **opts)
            next(iter(stream.epoch(0)))
            out["ttfb_warm_s"] = time.perf_counter() - t0
            stream.close()
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(20)
        daemon.stop()
    return out
