"""torchrun on CPU: 2 processes (gloo) share one daemon; each attaches with its global rank."""

import json
import subprocess
import sys

import torch

from test_trainer_train import TINY, _env

from prefetchd.control import request


def test_two_processes_share_one_daemon_and_fetch_each_field_once(synthetic, daemon, tmp_path):
    d = daemon()
    # 24 fields, 2 ranks × 4 per batch: 3 iterations are exactly one data epoch.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "trainer.train", "--config", str(TINY), "--no-wandb", "--run-name", "ddp",
               f"train.dataset_path={synthetic.local_dataset}", f"s3.socket={d.socket}",
               f"train.output_dir={tmp_path / 'checkpoints'}", "train.stop_after_iters=3", "s3.cache_size=64",
               "train.multiview_mode=all_channels"]
    result = subprocess.run(command, cwd=tmp_path, env=_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "checkpoints" / "ddp"
    log = [json.loads(line) for line in (run / "logs" / "log.txt").read_text().splitlines()]
    assert [m["iteration"] for m in log] == [1, 2, 3]
    assert all(m["samples_per_s"] > 0 and m["loss"] > 0 for m in log)
    state = torch.load(run / "ckpt" / "model_0000003.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["in_chans"] == 5 and state["student"]["backbone.patch_embed.proj.weight"].shape[1] == 5

    status = request("status", socket_path=d.socket)
    # 3 steps x 2 ranks x 4 = the 24 fields once; a rank may already have asked for its next batch (epoch 1,
    # served from the cache) before it stopped
    assert status["fields_served"] >= 24 and status["cache_misses"] == 24, status  # no field fetched twice
