"""What making fields one size costs in the decode path: one field decoded and preprocessed into its slot, as
is, centre-cropped (1080² Phenix → 1024²) and reflect-padded (1024² ImageXpress → 1080²), side by side.

    python -m bench.field_shape [--rounds 20] [--channels 5] [--raw]

Each round times every case once, in turn, on the same TIFF bytes (synthetic identity-encoding fields), so
machine noise hits them alike; prints the median milliseconds per field and the ratio to the same-size case.
`--raw` turns illumination, rescale and CLAHE off (the copy alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from prefetchd.decode import assemble_field
from prefetchd.dev import synth_layouts as sl
from prefetchd.field_shape import parse_shape
from prefetchd.preprocess import Preprocessing

PHENIX, IMAGEXPRESS = (1080, 1080), (1024, 1024)


def field_bytes(source: str, shape: tuple[int, int], channels: int) -> list[bytes]:
    site = sl.SynthSite(id=f"{source}/P/A01/1", source=source, batch="B", folder="P", barcode="P", well="A01",
                        site=1, keys={}, shape=shape)
    return [sl.tiff_bytes(sl.render(site, stain)) for stain in sl.STAINS[:channels]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--raw", action="store_true", help="no illumination, rescale or CLAHE")
    args = parser.parse_args(argv)
    opts = (Preprocessing.from_options(illum=False, rescale=False, clahe=False) if args.raw
            else Preprocessing.from_options(illum=False))
    c = args.channels
    cases = {   # name → (bytes, slot size, option)
        "1080² as is": (field_bytes("source_3", PHENIX, c), PHENIX, None),
        "1024² as is": (field_bytes("source_8", IMAGEXPRESS, c), IMAGEXPRESS, None),
        "1080² → 1024² crop": (field_bytes("source_3", PHENIX, c), IMAGEXPRESS, parse_shape({"mode": "crop", "size": 1024})),
        "1024² → 1080² pad": (field_bytes("source_8", IMAGEXPRESS, c), PHENIX, parse_shape({"mode": "pad", "size": 1080})),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = [f"ch{i}" for i in range(c)]
    for _ in range(args.rounds):
        for name, (blobs, size, option) in cases.items():
            out = np.empty((c, *size), np.uint16)
            started = time.perf_counter()
            assemble_field(blobs, [None] * c, opts, out, names, option)
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{c} channels, {'raw' if args.raw else 'rescale + CLAHE'}, median of {args.rounds} rounds, one thread")
    for name, ms in median.items():
        base = median["1080² as is"] if name.startswith("1080") else median["1024² as is"]
        print(f"  {name:<22} {ms:8.2f} ms/field   {ms / base:5.2f}× its size as is")


if __name__ == "__main__":
    main()
