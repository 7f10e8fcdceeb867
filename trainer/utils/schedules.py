import numpy as np


class CosineScheduler:
    """Per-iteration values: frozen at 0, linear warm-up, then cosine to `final_value`.

    A pure function of the iteration, so an exact resume needs only the iteration count.
    """

    def __init__(self, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0):
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        rest = max(total_iters - warmup_iters - freeze_iters, 0)
        steps = np.arange(rest)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(rest, 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine))[:total_iters]
        self.final_value = final_value

    def __getitem__(self, it: int) -> float:
        return float(self.schedule[it]) if it < len(self.schedule) else self.final_value
