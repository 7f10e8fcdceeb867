"""Benchmark: parse a synthetic `aws s3 ls --recursive` keys file of cpg0000 size (~3M keys, ~375k fields).

    python -m bench.index_keys [--plates 110] [--workdir DIR]

Prints the cold build (parse + group + cache write) time and peak RSS, then the warm load time.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "cpg0000-jump-pilot/source_4/images"
BATCHES = ("2020_11_04_CPJUMP1", "2020_11_18_CPJUMP1_TimepointDay1", "2020_12_08_CPJUMP1_Bleaching")


def write_keys_file(path: Path, plates: int) -> int:
    lines = 0
    with open(path, "w") as out:
        for p in range(plates):
            batch = BATCHES[p % len(BATCHES)]
            folder = f"{PREFIX}/{batch}/images/BR{p:08d}__2020-11-05T19_51_35-Measurement1/Images"
            for row in range(1, 17):
                for col in range(1, 25):
                    for site in range(1, 10):
                        for ch in range(1, 9):
                            out.write(f"2020-11-10 12:00:00    2560000 {folder}/"
                                      f"r{row:02d}c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff\n")
                            lines += 1
    return lines


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def build(keys_file: Path, cache_dir: Path, refresh: bool):
    from prefetchd.dataset import parse_dataset
    from prefetchd.index import build_index

    spec = parse_dataset(f"JUMPS3MultiView:bucket=cellpainting-gallery:prefix={PREFIX}")
    return await build_index(spec, {"endpoint_url": None}, cache_dir, refresh=refresh, keys_file=str(keys_file))


def measure(keys_file: Path, cache_dir: Path, refresh: bool) -> None:
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    index = asyncio.run(build(keys_file, cache_dir, refresh))
    seconds = time.perf_counter() - started
    kind = "cold build (parse + group + cache write)" if refresh else "warm load (cache → Index)"
    print(f"{kind}: {seconds:.2f} s, {len(index):,} fields, from_cache={index.from_cache}, "
          f"peak RSS {peak_rss_mb():.0f} MB (before {rss_before:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plates", type=int, default=110)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--phase", choices=("all", "cold", "warm"), default="all")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prefetchd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keys_file, cache_dir = workdir / "keys.txt", workdir / "cache"
    if args.phase == "all":
        started = time.perf_counter()
        lines = write_keys_file(keys_file, args.plates)
        size_mb = keys_file.stat().st_size / 1e6
        print(f"wrote {lines:,} keys ({size_mb:.0f} MB) in {time.perf_counter() - started:.1f} s to {keys_file}")
        for phase in ("cold", "warm"):  # each in a fresh process so peak RSS is its own
            subprocess.run([sys.executable, "-m", "bench.index_keys", "--workdir", str(workdir),
                            "--phase", phase], check=True)
        return
    measure(keys_file, cache_dir, refresh=args.phase == "cold")
    if args.phase == "warm":
        print(f"cache file: {next(cache_dir.iterdir())} ({next(cache_dir.iterdir()).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
