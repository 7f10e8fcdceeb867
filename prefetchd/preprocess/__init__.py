"""Per-channel preprocessing after decode: illumination correction, optional rescale, CLAHE.

`Preprocessing.from_options(...)` validates user options; `apply_channel` runs one channel and
writes uint16 into `out` (which may be a shared-memory slot view).
"""

from prefetchd.preprocess.pipeline import Preprocessing, apply_channel, illum_correct

__all__ = ["Preprocessing", "apply_channel", "illum_correct"]
