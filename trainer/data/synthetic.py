"""A small in-process source with the prefetchd stream interface, for unit tests and smoke runs.

Dataset string `Synthetic:fields=N:size=S`. Each field's pixels are a deterministic function of its
index (16-bit values above 255), served in the same order the daemon would serve them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefetchd.schedule import num_batches, schedule
from trainer.errors import TrainerError


@dataclass
class Batch:
    """What the trainer reads of a batch: the fields of prefetchd.client's Batch it uses."""

    ids: list[str]
    images: np.ndarray
    epoch: int
    index: int
    pixel_size_um: np.ndarray | None = None   # µm per pixel of each field (None: no source says)


class SyntheticSource:
    def __init__(self, n_fields: int, size: int, channels: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n_fields, self.size, self.channels = n_fields, size, channels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last
        self.batches_per_epoch = num_batches(n_fields, world_size, batch_size, drop_last)

    def field_id(self, index: int) -> str:
        row, col = divmod(index // 4 % 384, 24)
        return f"SYNTHETIC-PLATE{index // 1536:02d}/{'ABCDEFGHIJKLMNOP'[row]}{col + 1:02d}/{index % 4 + 1}"

    def field(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        base = rng.integers(300, 4000, size=(self.channels, 1, 1))
        noise = rng.integers(0, 600, size=(self.channels, self.size, self.size))
        return (base + noise).astype(np.uint16)

    def epoch(self, epoch: int, start_batch: int = 0):
        order = schedule(self.n_fields, self.seed, epoch, self.rank, self.world_size, self.batch_size,
                         self.drop_last)
        for index in range(start_batch, self.batches_per_epoch):
            fields = order[index * self.batch_size:(index + 1) * self.batch_size]
            images = np.stack([self.field(int(i)) for i in fields])
            images.flags.writeable = False
            yield Batch([self.field_id(int(i)) for i in fields], images, epoch, index)

    def status(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def parse_synthetic(text: str) -> dict[str, int]:
    values = {"fields": 64, "size": 64}
    for pair in text.split(":")[1:]:
        key, _, value = pair.partition("=")
        if key not in values or not value.isdigit():
            raise TrainerError(f"bad part {pair!r} in {text!r}; Synthetic accepts fields=N and size=S")
        values[key] = int(value)
    return values
