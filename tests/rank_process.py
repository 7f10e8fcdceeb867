"""One trainer rank in its own process, for tests (run as `python tests/rank_process.py '<json>'`).

It attaches like a trainer does (the job id comes from the environment unless `job` is given), reads `epochs`
epochs, sleeping `think_s` after each batch (its own pace), and records what arrived: the claimed ids, each
field's row-0 signature pixels of every channel and a digest of all its pixels, and the wait per batch. It
writes them to `out` (JSON), prints `done`, and with `hold` waits for a line on stdin before detaching, so a
test can read the daemon's status while every rank is still attached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np


def main() -> None:
    args = json.loads(sys.argv[1])
    from prefetchd.client import attach

    rank = int(os.environ.get("RANK", args.get("rank", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", args.get("world_size", 1)))
    stream = attach(args["dataset"], batch_size=args["batch_size"], seed=args.get("seed", 0), rank=rank,
                    world_size=world_size, socket=args["socket"], job=args.get("job"), timeout=300,
                    **args.get("options", {}))
    record = {"job": stream.job, "rank": rank, "batches_per_epoch": stream.batches_per_epoch, "batches": []}
    for epoch in range(args.get("epochs", 1)):
        for batch in stream.epoch(epoch):
            record["batches"].append({
                "epoch": epoch, "batch": batch.index, "ids": batch.ids, "waited_s": batch.waited_s,
                "signatures": batch.images[:, :, 0, :5].tolist(),
                "digests": [hashlib.blake2b(np.ascontiguousarray(f).tobytes(), digest_size=16).hexdigest()
                            for f in batch.images],
            })
            if args.get("think_s"):
                time.sleep(args["think_s"])   # this rank's pace: a training step that takes this long
    tmp = args["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, args["out"])
    print("done", flush=True)
    if args.get("hold"):
        sys.stdin.readline()
    stream.close()


if __name__ == "__main__":
    main()
