"""`python tests/trainer_recorder.py OUT_DIR [trainer.train arguments]`: the real trainer, recording what it trains on.

Every step's images are decoded back to field identities from their pixels (prefetchd.dev.synth signatures, which
survive only with illum, rescale and CLAHE off) and appended, one JSON line per step, to OUT_DIR/rank<r>.jsonl.
Only the observation is added: each step then runs unchanged. Works under torchrun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefetchd.dev import synth
from trainer.train import train

OUT = Path(sys.argv[1])
_step = train.TrainLoop._step


def recording_step(self, batch, iteration, loss_scale=1.0):
    fields = [list(synth.decode_signature(image[0]))[:4] for image in batch.images]
    with open(OUT / f"rank{self.rank}.jsonl", "a") as log:
        log.write(json.dumps({"iteration": iteration, "rank": self.rank, "world_size": self.world_size,
                              "loss_scale": loss_scale, "fields": fields, "ids": list(batch.ids)}) + "\n")
    return _step(self, batch, iteration, loss_scale)


train.TrainLoop._step = recording_step

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    raise SystemExit(train.main(sys.argv[2:]))
