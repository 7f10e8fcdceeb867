"""Benchmark: the whole-release index (8M sites, every layout) and load_data versus LIST.

    python -m bench.index_scale [--sites 8100000] [--workdir DIR] [--reuse] [--skip-requests] [--skip-scale]

1. Writes a jump_index.parquet-shaped file (one row per site, URL_Orig{AGP,DNA,ER,Mito,RNA}) with the
   release's mix of Phenix, Yokogawa and ImageXpress sources and real key names, a few plates at a time.
   Then, each in a fresh process so its peak RSS is its own: the cold build (stream the parquet, group,
   write the cache) and the warm load (cache → Index), plus a selection (source_8) and 100k field lookups.
2. On moto behind a 20 ms latency proxy: the same Phenix plates indexed from their per-plate load_data and by
   LIST (a copy without workspace/), side by side: requests, seconds, fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BUCKET = "cellpainting-gallery"
PROJECT = "cpg0016-jump"
STAINS = ("AGP", "DNA", "ER", "Mito", "RNA")
# source, layout, sites per well, share of the release's sites (roughly jump-cellpainting/datasets stats)
SOURCES = (("source_1", "phenix", 4, 0.057), ("source_2", "yokogawa", 6, 0.066), ("source_3", "phenix", 9, 0.128),
           ("source_4", "phenix", 9, 0.086), ("source_5", "yokogawa", 9, 0.086), ("source_6", "yokogawa", 9, 0.086),
           ("source_7", "yokogawa", 9, 0.064), ("source_8", "imagexpress", 9, 0.086),
           ("source_9", "phenix", 4, 0.057), ("source_10", "yokogawa", 6, 0.071), ("source_11", "phenix", 9, 0.064),
           ("source_13", "yokogawa", 9, 0.064), ("source_15", "phenix", 9, 0.085))
WELLS = [f"{chr(65 + r)}{c:02d}" for r in range(16) for c in range(1, 25)]
PHENIX_CH = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}
YOKOGAWA_C = {"DNA": 1, "ER": 2, "RNA": 3, "AGP": 4, "Mito": 5}
IMAGEXPRESS_W = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- 1. the 8M-site index --------------------------------------------------------------------------

def _plate_folder(layout: str, source: str, number: int) -> str:
    if layout == "phenix" and source != "source_9":
        return f"BR{number:08d}__2021-05-02T16_02_51-Measurement{' 1' if source == 'source_3' else '1'}"
    return f"P{source.split('_')[1]}-{number:06d}"


def _file_names(layout: str, folder: str, sites: int, stain: str, rng: np.random.Generator) -> pa.Array:
    names = []
    for well in WELLS:
        row, col = ord(well[0]) - 64, int(well[1:])
        for site in range(1, sites + 1):
            if layout == "phenix":
                names.append(f"r{row:02d}c{col:02d}f{site:02d}p01-ch{PHENIX_CH[stain]}sk1fk1fl1.tiff")
            elif layout == "yokogawa":
                c = YOKOGAWA_C[stain]
                names.append(f"{folder}_{well}_T0001F{site:03d}L01A{c:02d}Z01C{c:02d}.tif")
            else:
                guid = str(uuid.UUID(bytes=rng.bytes(16))).upper()
                names.append(f"HTS_{well}_s{site}_w{IMAGEXPRESS_W[stain]}{guid}.tif")
    return pa.array(names, pa.string())


def write_index(path: Path, total_sites: int) -> tuple[int, int]:
    """A jump_index-shaped parquet of about total_sites rows; returns (rows, plates)."""
    rng = np.random.default_rng(0)
    schema = pa.schema([("Metadata_Source", pa.string()), ("Metadata_Batch", pa.string()),
                        ("Metadata_Plate", pa.string()), ("Metadata_Well", pa.string()), ("Metadata_Site", pa.int64())]
                       + [(f"URL_Orig{s}", pa.string()) for s in STAINS])
    rows = plates = 0
    number = 100000
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for source, layout, sites, share in SOURCES:
            per_plate = len(WELLS) * sites
            wells = pa.array(np.repeat(WELLS, sites))
            site_numbers = pa.array(np.tile(np.arange(1, sites + 1), len(WELLS)))
            for p in range(max(1, round(total_sites * share / per_plate))):
                number += 1
                folder = _plate_folder(layout, source, number)
                batch = f"{source}_batch{p // 40:02d}"
                inner = "" if layout == "yokogawa" else "/Images"
                base = f"s3://{BUCKET}/{PROJECT}/{source}/images/{batch}/images/{folder}{inner}/"
                columns = {"Metadata_Source": pa.array([source] * per_plate),
                           "Metadata_Batch": pa.array([batch] * per_plate),
                           "Metadata_Plate": pa.array([folder.split("__")[0]] * per_plate),
                           "Metadata_Well": wells, "Metadata_Site": site_numbers}
                for stain in STAINS:
                    names = _file_names(layout, folder, sites, stain, rng)
                    columns[f"URL_Orig{stain}"] = pc.binary_join_element_wise(pa.scalar(base), names, "")
                writer.write_table(pa.table(columns, schema=schema))
                rows += per_plate
                plates += 1
    return rows, plates


async def _build(index_path: Path, cache_dir: Path, refresh: bool, extra: str = ""):
    from prefetchd.dataset import parse_dataset
    from prefetchd.index import build_index

    spec = parse_dataset(f"JUMPS3MultiView:bucket={BUCKET}:prefix={PROJECT}:index={index_path}{extra}")
    return await build_index(spec, {"endpoint_url": "http://127.0.0.1:9"}, cache_dir, refresh=refresh)


def phase(workdir: Path, which: str) -> None:
    index_path, cache_dir = workdir / "jump_index.parquet", workdir / "cache"
    started = time.perf_counter()
    index = asyncio.run(_build(index_path, cache_dir, refresh=which == "cold"))
    seconds = time.perf_counter() - started
    result = {"phase": which, "build_index_s": round(index.seconds, 2), "wall_s_with_imports": round(seconds, 2),
              "fields": len(index), "plates": len(index.plates),
              "peak_rss_mb": round(peak_rss_mb())}
    if which == "warm":
        positions = np.random.default_rng(1).integers(0, len(index), 100_000)
        started = time.perf_counter()
        for p in positions:
            index.fields[int(p)]
        result["field_lookup_us"] = round((time.perf_counter() - started) / len(positions) * 1e6, 2)
        started = time.perf_counter()
        ids = index.ids
        for p in positions[:10_000]:
            ids[int(p)]
        result["id_lookup_us"] = round((time.perf_counter() - started) / 10_000 * 1e6, 2)
        started = time.perf_counter()
        selected = asyncio.run(_build(index_path, cache_dir, refresh=False, extra=":source=source_8"))
        result["warm_select_source_8_s"] = round(time.perf_counter() - started, 2)
        result["source_8_fields"] = len(selected)
        result["peak_rss_mb"] = round(peak_rss_mb())
        cache = next(cache_dir.iterdir())
        result["cache_mb"] = round(cache.stat().st_size / 1e6, 1)
    print(json.dumps(result), flush=True)


def run_scale(workdir: Path, sites: int, reuse: bool) -> None:
    index_path = workdir / "jump_index.parquet"
    if reuse and index_path.exists():
        rows = pq.ParquetFile(index_path).metadata.num_rows
        print(f"reusing {index_path} ({rows:,} sites, {index_path.stat().st_size / 1e6:.0f} MB)", flush=True)
    else:
        started = time.perf_counter()
        rows, plates = write_index(index_path, sites)
        print(f"wrote {rows:,} sites on {plates:,} plates ({index_path.stat().st_size / 1e6:.0f} MB parquet) in "
              f"{time.perf_counter() - started:.0f} s: {index_path}", flush=True)
    for stale in (workdir / "cache").glob("*.arrow") if (workdir / "cache").exists() else ():
        stale.unlink()
    for which in ("cold", "warm"):
        subprocess.run([sys.executable, "-m", "bench.index_scale", "--workdir", str(workdir), "--phase", which],
                       check=True)


# ---- 2. load_data versus LIST --------------------------------------------------------------------

def run_requests(plates: int, wells: int, latency_ms: float) -> None:
    from bench.latency_proxy import LatencyProxy
    from prefetchd.dev import synth_layouts as sl
    from prefetchd.dataset import parse_dataset
    from prefetchd.index import build_index
    from prefetchd.dev.locals3 import LocalS3

    folders = tuple(f"BR{n:08d}__2021-05-02T16_02_51-Measurement1" for n in range(plates))
    spec = sl.MultiSpec(sources=(sl.SourceSpec("source_4", "phenix", {"B1": folders},
                                               wells=tuple(WELLS[:wells]), sites=9, illum=False),),
                        height=8, width=8)
    with LocalS3() as s3, tempfile.TemporaryDirectory() as tmp:
        client = s3.client(max_pool=32)
        manifest = sl.build_manifest(spec, "with-load-data")
        tiny = sl.tiff_bytes(np.zeros((8, 8), np.uint16))        # keys matter here, not pixels
        for bucket in ("with-load-data", "list-only"):
            s3.create_public_bucket(bucket)
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            keys = [key for key, _, _ in manifest.image_keys()]
            list(pool.map(lambda k: client.put_object(Bucket="with-load-data", Key=k, Body=tiny), keys))
            list(pool.map(lambda k: client.put_object(Bucket="list-only", Key=k, Body=tiny), keys))
            list(pool.map(lambda kv: client.put_object(Bucket="with-load-data", Key=kv[0], Body=kv[1]),
                          manifest.extra.items()))
        print(f"{plates} plates × {wells} wells × 9 sites × 5 channels = {len(keys):,} image keys; "
              f"{latency_ms:.0f} ms per request", flush=True)
        results = {}
        for bucket in ("with-load-data", "list-only"):
            with LatencyProxy(s3.endpoint_url, latency_ms=latency_ms) as proxy:
                before = proxy.stats()["requests"]
                started = time.perf_counter()
                index = asyncio.run(build_index(
                    parse_dataset(f"JUMPS3MultiView:bucket={bucket}:prefix={PROJECT}/source_4/images/B1"),
                    {"endpoint_url": proxy.endpoint_url, "list_concurrency": 16}, Path(tmp) / bucket))
                seconds = time.perf_counter() - started
                results[bucket] = (proxy.stats()["requests"] - before, seconds, index)
                print(f"  {bucket:15s} {results[bucket][0]:6,} requests  {seconds:6.2f} s  {len(index):,} fields  "
                      f"discovery={json.dumps({k: v for k, v in index.discovery.items() if k != 'batches_seen'})}",
                      flush=True)
        a, b = results["with-load-data"], results["list-only"]
        assert [f.keys for f in a[2].fields] == [f.keys for f in b[2].fields], "load_data and LIST disagree"
        print(f"  LIST / load_data: {b[0] / a[0]:.1f}× the requests, {b[1] / a[1]:.1f}× the time (same fields)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=8_100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--phase", choices=("all", "cold", "warm"), default="all")
    parser.add_argument("--skip-requests", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse the workdir's jump_index.parquet")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--plates", type=int, default=4, help="plates for the load_data / LIST comparison")
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prefetchd-index-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.phase != "all":
        phase(workdir, args.phase)
        return
    if not args.skip_scale:
        run_scale(workdir, args.sites, args.reuse)
    if not args.skip_requests:
        run_requests(args.plates, args.wells, args.latency_ms)


if __name__ == "__main__":
    main()
