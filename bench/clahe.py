"""ms per 1080² uint16 channel for each CLAHE implementation: `python -m bench.clahe [--size N] [--repeat R]`.

Prints OpenCV uint16 (65,536 bins), the guide's OpenCV 8-bit, ours on CPU (1 thread and all threads, in
the default 256-bin mode and in the OpenCV-compatible 65,536-bin mode), the robust rescale, ours in torch
on CPU, and ours on CUDA when a GPU is present. Times are the median of R runs on a cell-like channel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np

from bench import cell_like_channel
from prefetchd.preprocess import clahe as C


def timeit(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1080)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--clip-limit", type=float, default=3.0)
    ap.add_argument("--tile-grid", type=int, default=8)
    args = ap.parse_args(argv)
    img = cell_like_channel(args.size)
    img8 = cv2.imdecode(cv2.imencode(".png", img)[1], cv2.IMREAD_COLOR)[..., 0]   # the guide: default flag -> 8 bit
    cl, tg, R = args.clip_limit, args.tile_grid, args.repeat
    ncpu = os.cpu_count() or 1
    out = np.empty_like(img)
    print(f"CLAHE on one {args.size}x{args.size} uint16 channel (clip {cl}, tiles {tg}x{tg}); "
          f"kernel: {C.backend()}; median of {R} runs; {ncpu} CPUs")
    rows = []
    saved = cv2.getNumThreads()
    cv2.setNumThreads(1)
    clahe = cv2.createCLAHE(cl, (tg, tg))
    rows.append(("OpenCV uint16 (65,536 bins), 1 thread", timeit(lambda: clahe.apply(img), R)))
    rows.append(("OpenCV 8-bit (the guide), 1 thread", timeit(lambda: clahe.apply(img8), R)))
    cv2.setNumThreads(saved)
    rows.append((f"OpenCV uint16, {cv2.getNumThreads()} threads", timeit(lambda: clahe.apply(img), R)))
    for bins in (256, 65536):
        for threads in (1, ncpu):
            label = f"ours CPU bins={bins}{' (compatible)' if bins == 65536 else ''}, {threads} thread{'s' * (threads > 1)}"
            rows.append((label, timeit(lambda: C.clahe(img, cl, tg, bins, out=out, threads=threads), R)))
    rows.append(("ours rescale 0.1/99.9 (histogram + table), 1 thread", timeit(lambda: C.rescale(img, 0.1, 99.9, out=out), R)))
    rows.append(("ours numpy reference bins=256", timeit(lambda: C.clahe_numpy(img, cl, tg, 256), max(3, R // 10))))
    try:
        import torch

        from prefetchd.preprocess.clahe_torch import clahe_torch

        t = torch.from_numpy(img.astype(np.int32)).to(torch.uint16)
        rows.append((f"ours torch CPU bins=256, {torch.get_num_threads()} threads",
                     timeit(lambda: clahe_torch(t, cl, tg, 256), max(3, R // 10))))
        if torch.cuda.is_available():
            tc = t.cuda()

            def run():
                clahe_torch(tc, cl, tg, 256)
                torch.cuda.synchronize()

            rows.append((f"ours torch CUDA bins=256 ({torch.cuda.get_device_name()})", timeit(run, R)))
        else:
            rows.append(("ours torch CUDA", None))
    except ImportError:
        rows.append(("ours torch (torch not installed)", None))
    base = rows[0][1]
    for label, ms in rows:
        if ms is None:
            print(f"  {label:<60} n/a (no GPU)" if "CUDA" in label else f"  {label:<60} n/a")
        else:
            print(f"  {label:<60} {ms:8.2f} ms   {base / ms:5.1f}x vs OpenCV uint16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
