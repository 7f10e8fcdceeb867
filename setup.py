"""Only the native CLAHE kernel lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "prefetchd.preprocess._clahe",
            ["prefetchd/preprocess/_clahe.c"],
            # -ffp-contract=off: no fused multiply-add, so results are identical on every CPU and thread count.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"],
        )
    ]
)
