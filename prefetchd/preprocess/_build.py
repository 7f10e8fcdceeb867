"""Build the native CLAHE kernel in place: `python -m prefetchd.preprocess._build`.

`pip install -e .` builds it too once pyproject/setup declares the extension (see docs/clahe.md); this
helper is for a checkout where that has not happened yet. Without the kernel, prefetchd falls back to the
(slower, identical) numpy implementation.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def extension():
    from setuptools import Extension

    return Extension(
        "prefetchd.preprocess._clahe",
        sources=["prefetchd/preprocess/_clahe.c"],
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"],
    )


def main() -> int:
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    root = Path(__file__).resolve().parents[2]
    import os

    os.chdir(root)
    dist = Distribution({"name": "prefetchd-clahe", "ext_modules": [extension()]})
    cmd = build_ext(dist)
    cmd.inplace = True
    tmp = tempfile.mkdtemp(prefix="prefetchd-build-")
    cmd.build_temp = os.path.join(tmp, "temp")
    cmd.build_lib = os.path.join(tmp, "lib")
    cmd.ensure_finalized()
    cmd.run()
    print("built", cmd.get_ext_fullpath("prefetchd.preprocess._clahe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
