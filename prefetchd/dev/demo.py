"""`prefetchd demo`: the whole path on this machine, no network needed.

Synthetic plates with the real cpg0000 key names → moto's S3 API server on loopback → a real
`prefetchd serve` process → a client streaming epochs out of shared memory, then a summary table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prefetchd.dev import synth
from prefetchd.client import attach
from prefetchd.control import request
from prefetchd.dev.daemon_process import DaemonProcess
from prefetchd.dev.locals3 import LocalS3

BUCKET = "cellpainting-gallery"


def demo_spec(fields: int | None, size: int | None) -> synth.SynthSpec:
    spec = synth.demo_spec()
    if size:
        spec = dataclasses.replace(spec, height=size, width=size)
    if fields:
        per_well = spec.sites * len(spec.plates)
        wells = tuple(synth.well_name(r, c) for r in range(1, 17) for c in range(1, 25))
        spec = dataclasses.replace(spec, wells=wells[: max(1, -(-fields // per_well))])
    return spec


def run_demo(args) -> int:
    console = Console(width=None if sys.stdout.isatty() else 110)
    spec = demo_spec(args.fields, args.size)
    with tempfile.TemporaryDirectory(prefix="prefetchd-demo-") as tmp:
        tmp_path = Path(tmp)
        data_dir = Path(args.data_dir) if args.data_dir else tmp_path / "plates"
        results = _run(console, spec, data_dir, tmp_path, args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(console, results)
    return 0


def _run(console: Console, spec: synth.SynthSpec, data_dir: Path, tmp: Path, args) -> dict:
    t0 = time.monotonic()
    with console.status(f"generating {spec.field_count} synthetic fields ({spec.height}×{spec.width}, "
                        f"{len(spec.channels)} channels, 16-bit) in {data_dir} …"):
        manifest = synth.write_plates(data_dir, spec)
    generated_s = time.monotonic() - t0
    with LocalS3() as s3:
        s3.create_public_bucket(BUCKET)
        t0 = time.monotonic()
        with console.status(f"uploading to a local S3 server at {s3.endpoint_url} …"):
            synth.upload(manifest, s3.endpoint_url, BUCKET)
        uploaded_s = time.monotonic() - t0
        endpoint = s3.endpoint_url
        dataset = f"JUMPS3MultiView:bucket={BUCKET}:prefix={spec.prefix}"
        socket = tmp / "prefetchd.sock"
        overrides = [f"s3.endpoint_url={s3.endpoint_url}", f"cache_dir={tmp / 'cache'}"]
        with DaemonProcess(socket, overrides, log_path=tmp / "daemon.log"):
            console.print(f"daemon up on {socket}; streaming {args.epochs} epochs of {dataset}")
            epochs = _stream(console, dataset, socket, spec, args)
            status = request("status", socket)
    return {
        "dataset": dataset,
        "endpoint": endpoint,
        "fields": spec.field_count,
        "field_shape": [len(spec.channels), spec.height, spec.width],
        "generate_s": generated_s,
        "upload_s": uploaded_s,
        "epochs": epochs,
        "daemon": {k: status[k] for k in ("gets", "bytes_fetched", "retries", "quarantined", "stall_s")},
    }


def _stream(console: Console, dataset: str, socket: Path, spec: synth.SynthSpec, args) -> list[dict]:
    cache_size = args.cache_size or max(spec.field_count, 3 * args.batch_size)
    t_attach = time.monotonic()
    stream = attach(dataset=dataset, batch_size=args.batch_size, seed=0, socket=socket, cache_size=cache_size,
                    prefetch_factor=2)
    attach_s = time.monotonic() - t_attach
    rows = []
    try:
        for epoch in range(args.epochs):
            before = stream.status()
            started = time.monotonic()
            fields = nbytes = 0
            first_batch_s = None
            for batch in stream.epoch(epoch):
                if first_batch_s is None:
                    first_batch_s = time.monotonic() - started
                fields += len(batch.ids)
                nbytes += batch.images.nbytes
                _check_pixels(batch)
            seconds = time.monotonic() - started
            after = stream.status()
            job = next(j for j in after["jobs"] if j["job"] == stream.job)
            ep = job["epochs"].get(str(epoch), {})
            rows.append({
                "epoch": epoch,
                "fields": fields,
                "seconds": seconds,
                "fields_per_s": fields / seconds,
                "delivered_mb_per_s": nbytes / seconds / 1e6,
                "fetched_mb": (after["bytes_fetched"] - before["bytes_fetched"]) / 1e6,
                "gets": after["gets"] - before["gets"],
                "hit_rate": ep.get("hit_rate", 0.0),
                "hit_rate_bound": min(1.0, cache_size / spec.field_count) if epoch else 0.0,
                "first_batch_s": (attach_s if epoch == 0 else 0.0) + (first_batch_s or 0.0),
            })
            console.print(f"epoch {epoch}: {fields} fields in {seconds:.1f} s")
    finally:
        stream.close()
    return rows


def _check_pixels(batch) -> None:
    if int(batch.images.max()) <= 255:
        raise AssertionError("delivered pixels fit in 8 bits: the 16-bit path is broken")


def _print_results(console: Console, r: dict) -> None:
    table = Table(title=f"prefetchd demo: {r['fields']} fields of {'×'.join(map(str, r['field_shape']))} uint16 "
                        f"from {r['endpoint']}")
    for col in ("epoch", "fields/s", "MB/s delivered", "MB fetched", "GETs", "hit rate", "C/N bound",
                "first batch"):
        table.add_column(col, justify="right")
    for e in r["epochs"]:
        table.add_row(str(e["epoch"]), f"{e['fields_per_s']:.1f}", f"{e['delivered_mb_per_s']:.0f}",
                      f"{e['fetched_mb']:.0f}", str(e["gets"]), f"{e['hit_rate']:.0%}",
                      f"{e['hit_rate_bound']:.0%}", f"{e['first_batch_s']:.2f} s")
    console.print(table)
    d = r["daemon"]
    console.print(f"daemon: {d['gets']} GETs, {d['bytes_fetched'] / 1e6:.0f} MB fetched, {d['retries']} retries, "
                  f"{d['quarantined']} quarantined, consumer stalled {d['stall_s']:.1f} s in total; "
                  f"data generated in {r['generate_s']:.1f} s, uploaded in {r['upload_s']:.1f} s")
    console.print("C/N bound: the best hit rate any cache of C fields can reach on N fields under a random "
                  "order with no reuse knowledge (epoch 0 always misses).")
