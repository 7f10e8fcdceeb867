"""Training end to end on the real daemon: log.txt, checkpoints, exact resume, wandb offline, embeddings,
one-line errors, and the launcher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from prefetchd.shm.arena import read_owner_pid
from trainer.embed import main as embed_main
from trainer.train.train import main as train_main

from prefetchd.shm.arena import read_owner_pid

from conftest import REPO_ROOT, shm_segments

TINY = REPO_ROOT / "configs" / "test_tiny.yaml"
LAUNCHER = REPO_ROOT / "launch_ssl_with_s3_wandb.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _train(tmp_path: Path, *args: str, env: dict | None = None, config: Path | None = TINY):
    command = [sys.executable, "-m", "trainer.train", *(["--config", str(config)] if config else []), *args]
    return subprocess.run(command, cwd=tmp_path, env=env or _env(), capture_output=True, text=True, timeout=120)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "log.txt").read_text().splitlines()]


def _data_args(synthetic, daemon_handle, tmp_path: Path) -> list[str]:
    return [f"train.dataset_path={synthetic.local_dataset}", f"s3.socket={daemon_handle.socket}",
            f"train.output_dir={tmp_path / 'checkpoints'}"]


def test_training_logs_checkpoints_and_resumes_exactly(synthetic, daemon, tmp_path, capsys):
    d = daemon()
    # 24 fields, 8 per batch: 3 batches per data epoch; 6 iterations cross a data epoch boundary.
    common = [*_data_args(synthetic, d, tmp_path), "--no-wandb", "train.batch_size_per_gpu=8",
              "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=2", "train.saveckp_freq=4",
              "student.drop_path_rate=0.1"]
    full = _train(tmp_path, *common, "--run-name", "full")
    assert full.returncode == 0, full.stderr
    part = _train(tmp_path, *common, "--run-name", "part", "train.stop_after_iters=2")
    assert part.returncode == 0, part.stderr
    resumed = _train(tmp_path, "--resume", "part", "--no-wandb", f"train.output_dir={tmp_path / 'checkpoints'}",
                     f"s3.socket={d.socket}", config=None)
    assert resumed.returncode == 0, resumed.stderr

    run = tmp_path / "checkpoints" / "full"
    uninterrupted, stitched = _log(run), _log(tmp_path / "checkpoints" / "part")
    assert [m["iteration"] for m in stitched] == [1, 2, 3, 4, 5, 6] == [m["iteration"] for m in uninterrupted]
    assert [m["first_id"] for m in stitched] == [m["first_id"] for m in uninterrupted]
    assert [m["loss"] for m in stitched] == [m["loss"] for m in uninterrupted]
    assert uninterrupted[3]["data_epoch"] == 1 and uninterrupted[3]["batch_index"] == 0
    for key in ("loss", "dino_loss", "koleo_loss", "ibot_loss", "lr", "wd", "samples_per_s", "fields_per_s",
                "data_wait_share", "daemon_hit_rate", "daemon_fetch_mb_per_s"):
        assert key in uninterrupted[-1]
    assert f"log: checkpoints/full/logs/log.txt" in full.stdout.replace(str(tmp_path) + "/", "")

    state = torch.load(run / "ckpt" / "model_0000006.pth", weights_only=True)
    assert (run / "ckpt" / "model_0000004.pth").exists()
    assert state["iteration"] == 6 and state["data"] == {"epoch": 2, "samples": 0}
    at_4 = torch.load(run / "ckpt" / "model_0000004.pth", weights_only=True)
    assert at_4["data"] == {"epoch": 1, "samples": 8}  # one batch of 8 into data epoch 1
    assert {"student", "teacher", "optimizer", "dino_loss", "ibot_patch_loss", "rng", "config"} <= set(state)
    final_part = torch.load(tmp_path / "checkpoints" / "part" / "ckpt" / "model_0000006.pth", weights_only=True)
    for key, value in state["teacher"].items():
        assert torch.equal(value, final_part["teacher"][key]), key

    out = tmp_path / "emb.parquet"
    assert embed_main(["--checkpoint", str(run), "--output", str(out), f"s3.socket={d.socket}"]) == 0
    table = pq.read_table(out).to_pydict()
    ids = {f"{p}/{w}/{s}" for p, w, s in zip(table["plate"], table["well"], table["site"])}
    assert ids == {f.id for f in synthetic.manifest.fields}
    assert {len(v) for v in table["vector"]} == {5 * 64}  # channel_as_view: one vit_pico vector per channel

    _assert_one_line(capsys, embed_main(["--checkpoint", str(run), "train.channels=DNA,ER"]), "checkpoint was trained on 5")
    _assert_one_line(capsys, train_main(["--resume", str(run), "--no-wandb", "train.channels=[DNA, ER]"]),
                     "but the checkpoint was trained on 5")


def _assert_one_line(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "model.pth"
    garbage.write_bytes(b"not a checkpoint")
    _assert_one_line(capsys, train_main(["--resume", str(garbage), "--no-wandb"]), "cannot read checkpoint")
    _assert_one_line(capsys, embed_main(["--checkpoint", str(garbage)]), "cannot read checkpoint")
    _assert_one_line(capsys, train_main(["--config", str(TINY), "optim.lrr=1"]), "accepted keys here: optim.epochs")
    _assert_one_line(capsys, train_main(["--config", str(TINY), f"train.output_dir={tmp_path}", "train.samples_per_field=0"]),
                     "train.samples_per_field must be 1 or more")
    _assert_one_line(capsys, train_main(["--config", str(TINY), f"train.output_dir={tmp_path}",
                                         "ibot.mask_ratio_min_max=[0.5,0.2]"]), "ibot.mask_ratio_min_max must be")
    old = tmp_path / "old.pth"
    torch.save({"format": 1, "student": {}, "teacher": {}, "optimizer": {}, "iteration": 1, "data": {},
                "channels": [], "config": {}}, old)
    _assert_one_line(capsys, train_main(["--resume", str(old), "--no-wandb"]), "checkpoint format 1")
    missing = tmp_path / "c.yaml"
    missing.write_text("optim:\n  epochs: 1\n")
    _assert_one_line(capsys, train_main(["--config", str(missing)]), "missing config key train.dataset_path")
    _assert_one_line(capsys, train_main(["--config", str(TINY), "--no-wandb", f"train.output_dir={tmp_path}",
                                 "train.dataset_path=JUMPLocal:root=/nonexistent",
                                 f"s3.socket={tmp_path / 'none.sock'}"]), "no prefetchd daemon is listening")


def test_run_folder_is_named_after_the_config_and_never_reused_silently(tmp_path, capsys):
    args = ["--config", str(TINY), "--no-wandb", f"train.output_dir={tmp_path}",
            "train.dataset_path=Synthetic:fields=16:size=48", "train.stop_after_iters=1"]
    assert train_main(args) == 0
    assert len(_log(tmp_path / "test_tiny")) == 1  # checkpoints/<config name>/logs/log.txt
    capsys.readouterr()
    _assert_one_line(capsys, train_main(args), f"{tmp_path / 'test_tiny'} already holds a run; continue it with --resume")
    assert len(_log(tmp_path / "test_tiny")) == 1  # untouched
    assert train_main([*args[:-1], "--resume", "train.stop_after_iters=2"]) == 0  # the config's run
    assert [m["iteration"] for m in _log(tmp_path / "test_tiny")] == [1, 2]
    capsys.readouterr()
    _assert_one_line(capsys, train_main([*args[:-1], "--resume", "student.num_register_tokens=3"]),
                     "the checkpoint's model differs from this config's")
    assert train_main([*args, "--run-name", "other"]) == 0
    assert len(_log(tmp_path / "other")) == 1


def test_wandb_goes_offline_with_a_notice_when_not_logged_in(synthetic, daemon, tmp_path):
    d = daemon()
    home = tmp_path / "home"
    home.mkdir()
    result = _train(tmp_path, *_data_args(synthetic, d, tmp_path), "--run-name", "w", "train.stop_after_iters=2",
                    env=_env(HOME=str(home)))
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("wandb: not logged in")]
    assert len(notices) == 1
    offline = list((tmp_path / "checkpoints" / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_launcher_starts_and_stops_a_daemon_when_none_answers(synthetic, tmp_path):
    help_text = subprocess.run([str(LAUNCHER), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--no-s3", "--no-wandb", "--wandb-project", "--wandb-name", "--nproc-per-node", "--config",
                   "--resume", "key=value"):
        assert option in help_text
    before = shm_segments()
    sock = tmp_path / "p.sock"
    result = subprocess.run(
        [str(LAUNCHER), "--config", str(TINY), "--no-s3", str(synthetic.root), "--no-wandb", "--wandb-name", "L",
         "train.stop_after_iters=2"],
        cwd=tmp_path, env=_env(PREFETCHD_SOCKET=str(sock)), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    started = re.search(r"started one for this run \(pid (\d+)", result.stderr)
    assert started, result.stderr
    assert len(_log(tmp_path / "checkpoints" / "L")) == 2
    leaked = {name for name in shm_segments() - before if read_owner_pid(name) == int(started.group(1))}
    assert not sock.exists() and leaked == set()  # only that daemon's segments: others may run on this machine


def test_launcher_without_daemon_or_permission_to_start_one_is_one_line(tmp_path):
    result = subprocess.run([str(LAUNCHER), "--config", str(TINY), "--no-wandb"], cwd=tmp_path,
                            env=_env(PREFETCHD_SOCKET="/proc/forbidden/p.sock"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no prefetchd daemon is running")


def test_sigterm_checkpoints_the_current_step_and_resume_continues(synthetic, daemon, tmp_path):
    d = daemon()
    args = [*_data_args(synthetic, d, tmp_path), "--no-wandb", "--run-name", "preempted", "train.batch_size_per_gpu=4",
            "train.OFFICIAL_EPOCH_LENGTH=6", "optim.epochs=50", "train.saveckp_freq=1000"]
    command = [sys.executable, "-m", "trainer.train", "--config", str(TINY), *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "checkpoints" / "preempted" / "logs" / "log.txt"
    try:
        deadline = time.monotonic() + 90
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)  # polling the log for a condition, bounded by the deadline
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    last = _log(tmp_path / "checkpoints" / "preempted")[-1]["iteration"]
    assert f"preempted: checkpoint saved at iteration {last}" in out
    state = torch.load(tmp_path / "checkpoints" / "preempted" / "ckpt" / f"model_{last:07d}.pth", weights_only=True)
    assert state["iteration"] == last < 300
