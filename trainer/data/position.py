"""The data position of a run as a global sample count, so a run resumes on any number of processes.

The daemon's schedule deals an epoch's permutation out like `DistributedSampler`: sample j of rank r is
global position j · world_size + r. After b full steps every rank has consumed b · batch_size samples,
which are exactly global positions [0, b · batch_size · world_size). So `(epoch, samples)` says what
was consumed independently of the world size that consumed it. A run resumed with another world size
(or batch size) starts at the batch that holds global position `samples` and drops, from that first
batch, the leading samples that were already trained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    samples: int = 0          # fields of `epoch` consumed by all ranks together

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(int(data["epoch"]), int(data["samples"]))


def after_batch(epoch: int, index: int, batches_per_epoch: int, world_size: int, batch_size: int) -> DataPosition:
    """The position once every rank has consumed batch `index` of `epoch`."""
    if index + 1 >= batches_per_epoch:
        return DataPosition(epoch + 1, 0)
    return DataPosition(epoch, (index + 1) * batch_size * world_size)


def resume_point(position: DataPosition, rank: int, world_size: int, batch_size: int,
                 batches_per_epoch: int) -> tuple[int, int, int]:
    """(epoch, first batch index, leading samples of that batch to skip) for `rank` of `world_size`."""
    per_step = batch_size * world_size
    start = position.samples // per_step
    if start >= batches_per_epoch:  # the epoch's remainder is shorter under this layout (drop_last)
        return position.epoch + 1, 0, 0
    done_in_step = position.samples - start * per_step
    # This rank's sample j of the step is at global position start·per_step + j·world_size + rank.
    skip = max(0, -(-(done_in_step - rank) // world_size))
    return position.epoch, start, min(skip, batch_size)
