"""Elastic resume: a run checkpointed on N processes continues on M, and every field of the epoch is trained on
exactly once overall, judged from the pixels each rank actually trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from prefetchd.dev import synth
from prefetchd.schedule import num_batches, schedule
from trainer.data.position import DataPosition, after_batch, resume_point

from conftest import REPO_ROOT
from test_trainer_train import TINY, _env

RECORDER = Path(__file__).parent / "trainer_recorder.py"


# ---------------------------------------------------------------------------------------------
# The position arithmetic, against the daemon's own schedule


def _trained_after_resume(n, old_world, old_batch, steps, new_world, new_batch, seed=3):
    """Fields trained on: `steps` steps on old_world ranks, then the rest of the epoch on new_world ranks."""
    trained = Counter()
    for rank in range(old_world):
        trained.update(schedule(n, seed, 0, rank, old_world, old_batch)[:steps * old_batch].tolist())
    position = after_batch(0, steps - 1, num_batches(n, old_world, old_batch, False), old_world, old_batch)
    new_batches = num_batches(n, new_world, new_batch, False)
    for rank in range(new_world):
        epoch, start, skip = resume_point(position, rank, new_world, new_batch, new_batches)
        assert epoch == 0
        mine = schedule(n, seed, 0, rank, new_world, new_batch)
        first = mine[start * new_batch:(start + 1) * new_batch]
        trained.update(first[skip:].tolist() if skip < len(first) else [])  # a fully seen batch trains with weight 0
        trained.update(mine[(start + 1) * new_batch:].tolist())
    return trained


@pytest.mark.parametrize("old_world, old_batch, steps, new_world, new_batch", [
    (2, 4, 1, 1, 4), (1, 4, 1, 2, 4), (8, 4, 3, 4, 8), (4, 8, 2, 8, 4), (4, 3, 2, 3, 2), (7, 1, 1, 2, 4),
    (8, 2, 5, 6, 3), (1, 5, 3, 7, 2),
])
def test_resume_point_covers_the_rest_of_the_epoch_exactly_once(old_world, old_batch, steps, new_world, new_batch):
    n = 168  # divisible by every world size above: no DistributedSampler padding
    trained = _trained_after_resume(n, old_world, old_batch, steps, new_world, new_batch)
    assert set(trained) == set(range(n)) and set(trained.values()) == {1}


def test_position_is_a_global_sample_count():
    assert after_batch(0, 2, 10, 8, 32) == DataPosition(0, 3 * 32 * 8)
    assert after_batch(4, 9, 10, 8, 32) == DataPosition(5, 0)
    assert resume_point(DataPosition(0, 768), 0, 4, 32, 100) == (0, 6, 0)  # 8 × 32 × 3 on 4 ranks: batch 6
    assert resume_point(DataPosition(2, 96), 0, 1, 64, 50) == (2, 1, 32)  # half of batch 1 already trained
    # 4 trained by one rank, resumed on two: positions 0-3 are rank 0's samples 0, 1 and rank 1's samples 0, 1
    assert [resume_point(DataPosition(0, 4), r, 2, 4, 3) for r in (0, 1)] == [(0, 0, 2), (0, 0, 2)]
    assert [resume_point(DataPosition(0, 3), r, 2, 4, 3) for r in (0, 1)] == [(0, 0, 2), (0, 0, 1)]
    assert resume_point(DataPosition(2, 640), 0, 4, 32, 5) == (3, 0, 0)  # beyond this layout's epoch
    assert DataPosition.from_dict(DataPosition(3, 12).as_dict()) == DataPosition(3, 12)


# ---------------------------------------------------------------------------------------------
# End to end: torchrun with gloo on CPU against the real daemon


def _run(tmp_path: Path, record: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command = [*prefix, str(RECORDER), str(record), "--config", str(TINY), "--no-wandb", *args]
    result = subprocess.run(command, cwd=tmp_path, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _trained_fields(record: Path) -> list[tuple]:
    steps = [json.loads(line) for path in sorted(record.glob("rank*.jsonl")) for line in path.read_text().splitlines()]
    assert steps, f"nothing recorded in {record}"
    fields = []
    for step in steps:
        assert step["loss_scale"] == 1.0
        assert len(step["fields"]) == len(step["ids"])
        fields += [tuple(f) for f in step["fields"]]
    return fields


def _expected_fields(synthetic) -> Counter:
    return Counter((synth.plate_code(f.plate), *synth.parse_well(f.well), f.site) for f in synthetic.manifest.fields)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_elastic_resume_trains_on_every_field_of_the_epoch_exactly_once(synthetic, daemon, tmp_path, before, after):
    d = daemon()
    # 24 fields, 4 per rank and step. The first run stops after one step (8 fields on 2 ranks, 4 on 1); the
    # resumed run finishes the epoch: from 8 on 1 rank that is 4 more steps; from 4 on 2 ranks the first step
    # drops the 2 + 2 already trained fields, then 2 full steps.
    data = [f"train.dataset_path={synthetic.local_dataset}", f"s3.socket={d.socket}", "s3.illum=false",
            "s3.rescale=false", "s3.clahe=false", f"train.output_dir={tmp_path / 'checkpoints'}",
            "train.batch_size_per_gpu=4", "train.multiview_mode=all_channels"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    _run(tmp_path, first, before, *data, "--run-name", "elastic", "train.stop_after_iters=1")
    end_of_epoch = 5 if after == 1 else 4
    _run(tmp_path, resumed, after, *data, "--resume", "elastic", f"train.stop_after_iters={end_of_epoch}")

    seen_first, seen_resumed = _trained_fields(first), _trained_fields(resumed)
    assert len(seen_first) == 4 * before
    seen = Counter(seen_first) + Counter(seen_resumed)
    assert seen == _expected_fields(synthetic)  # every field once: none lost, none trained twice

    run = tmp_path / "checkpoints" / "elastic"
    state = torch.load(run / "ckpt" / f"model_{end_of_epoch:07d}.pth", weights_only=True)
    assert state["world_size"] == after and state["data"] == {"epoch": 1, "samples": 0}
    log = [json.loads(line) for line in (run / "logs" / "log.txt").read_text().splitlines()]
    assert [m["iteration"] for m in log] == list(range(1, end_of_epoch + 1))
    assert log[0]["data_samples"] == 4 * before
