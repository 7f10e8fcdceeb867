"""Write docs/img/clahe_comparison.png: `python -m bench.clahe_figure [--out PATH]`.

One demo channel (cell-like, 16-bit) four ways, each with its histogram: raw (display-stretched to its
0.1/99.9 percentiles), the guide's 8-bit CLAHE (cv2.imdecode default flag -> 8 bits, then 8-bit CLAHE),
OpenCV uint16 CLAHE (65,536 bins), and prefetchd's default (rescale 0.1/99.9 + 256-bin 16-bit CLAHE).
Needs matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from bench import cell_like_channel
from prefetchd.preprocess import Preprocessing, apply_channel
from prefetchd.preprocess.clahe import rescale


def panels(img: np.ndarray):
    decoded8 = cv2.imdecode(cv2.imencode(".png", img)[1], cv2.IMREAD_COLOR)[..., 0]   # the guide's decode
    guide = cv2.createCLAHE(3.0, (8, 8)).apply(decoded8).astype(np.uint16) * 257
    opencv16 = cv2.createCLAHE(3.0, (8, 8)).apply(img)
    ours = np.empty_like(img)
    apply_channel(img, None, Preprocessing.from_options(illum=False), ours)
    return [
        ("raw 16-bit (display-stretched 0.1-99.9%)", rescale(img, 0.1, 99.9), img),
        (f"guide: imdecode 8-bit + CLAHE\n{len(np.unique(decoded8))} input levels", guide, guide),
        ("OpenCV uint16 CLAHE (65,536 bins)", opencv16, opencv16),
        ("prefetchd: rescale + CLAHE bins=256", ours, ours),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "clahe_comparison.png"))
    ap.add_argument("--size", type=int, default=1080)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = cell_like_channel(args.size)
    ps = panels(img)
    fig, axes = plt.subplots(2, 4, figsize=(18, 9), gridspec_kw={"height_ratios": [3, 1.2]})
    for i, (title, shown, data) in enumerate(ps):
        ax = axes[0, i]
        ax.imshow(shown, cmap="gray", vmin=0, vmax=65535, interpolation="lanczos")
        ax.set_title(title, fontsize=11)
        ax.axis("off")
        h = axes[1, i]
        h.hist(data.ravel(), bins=256, range=(0, 65535), color="C0", log=True)
        h.set_xlim(0, 65535)
        h.set_xticks([0, 16384, 32768, 49152, 65535])
        h.tick_params(labelsize=8)
        h.set_title(f"mean {data.mean():,.0f}  distinct levels {len(np.unique(data)):,}", fontsize=9)
    fig.suptitle(f"CLAHE clip 3.0, 8x8 tiles on a {img.shape[1]}x{img.shape[0]} cell-like uint16 channel "
                 f"(max {img.max():,}); histograms over the 16-bit range, log counts", fontsize=12)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
