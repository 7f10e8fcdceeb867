"""Per-channel preprocessing after decode: illumination correction, robust rescale, CLAHE.

`Preprocessing.from_options(...)` validates user options; `apply_channel` runs one channel and
writes uint16 into `out` (which may be a shared-memory slot view). `prefetchd.preprocess.clahe` holds
the CPU CLAHE (`clahe`, `clahe_numpy`) and `rescale`; `prefetchd.preprocess.clahe_torch.clahe_torch` is the torch one (imported lazily:
torch is only needed by the trainer).
"""

from prefetchd.preprocess.pipeline import ClaheOptions, Preprocessing, RescaleOptions, apply_channel, illum_correct

__all__ = ["ClaheOptions", "Preprocessing", "RescaleOptions", "apply_channel", "illum_correct"]
