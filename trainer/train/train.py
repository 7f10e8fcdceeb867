"""DINOv2-style self-supervised training (DINO + iBOT + KoLeo) on the prefetchd stream.

    python -m trainer.train --config configs/dinov3_vits8_jump_s3_multiview.yaml [key=value ...]
    torchrun --nproc-per-node 2 -m trainer.train --config ... train.dataset_path=JUMPLocal:root=DIR
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from prefetchd.errors import PrefetchdError
from trainer.config import load_config
from trainer.data.augmentations import make_augmentation
from trainer.data.collate import collate_masks
from trainer.data.masking import make_mask_generator
from trainer.data.position import DataPosition, after_batch, resume_point
from trainer.data.source import make_source
from trainer.data.to_device import images_to_device_with_clahe, normalize_per_channel, trainer_clahe_options
from trainer.errors import TrainerError
from trainer.models import in_chans_for
from trainer.train.schedulers import apply_optim_scheduler, build_schedulers
from trainer.train.ssl_meta_arch import SSLMetaArch
from trainer.utils import distributed
from trainer.utils.checkpoint import check_channels, find_checkpoint, load_checkpoint, save_checkpoint
from trainer.utils.metric_log import MetricLog
from trainer.utils.rng import get_rng_state, set_rng_state, step_generator, step_numpy_rng, step_seed
from trainer.utils.wandb_run import make_wandb_run

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dinov3_vits8_jump_s3_multiview.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("trainer.train", description="DINOv2-style training on prefetchd streams")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--run-name", default=None,
                        help="run name: logs and checkpoints in <output_dir>/<run> (default: the config's name)")
    parser.add_argument("--resume", nargs="?", const="", default=None,
                        help="resume a run: its name, directory or checkpoint file (default: the run of "
                             "--run-name or --config, else the newest run)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    parser.add_argument("--wandb-project", default="prefetchd-dino")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="config overrides")
    return parser


def default_run_name(args) -> str:
    return args.run_name or Path(args.config or DEFAULT_CONFIG).stem


def resolve_run(args, output_dir: Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume or None)."""
    if args.resume is None:
        run_dir = output_dir / default_run_name(args)
        if _holds_a_run(run_dir):
            raise TrainerError(
                f"{run_dir} already holds a run; continue it with --resume, start another with --run-name NAME "
                "(launcher: --wandb-name NAME), or remove the folder")
        return run_dir, None
    if args.resume:
        target = Path(args.resume)
        if not target.exists() and (output_dir / args.resume).exists():
            target = output_dir / args.resume
    elif args.run_name or args.config:
        target = output_dir / default_run_name(args)
    else:
        target = _newest_run(output_dir)
    if not target.exists():
        raise TrainerError(f"nothing to resume at {target}: give a run name, run directory or checkpoint")
    checkpoint = find_checkpoint(target)
    return checkpoint.parents[1], checkpoint


def _holds_a_run(run_dir: Path) -> bool:
    """A folder with a log or checkpoints (one with only config.yaml never took a step)."""
    return (run_dir / "logs" / "log.txt").exists() or (run_dir / "ckpt").exists()


def _newest_run(output_dir: Path) -> Path:
    runs = sorted(output_dir.glob("*/ckpt/last_checkpoint"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise TrainerError(f"--resume: no run with a checkpoint under {output_dir}/")
    return runs[-1].parents[1]


def setup(args) -> tuple[dict, Path, dict | None]:
    overrides = list(args.opts)
    # The output directory is needed to find a resumed run, before that run's config is known.
    output_dir = Path(load_config(args.config or DEFAULT_CONFIG, overrides, require=False)["train"]["output_dir"])
    run_dir, checkpoint = distributed.broadcast_object(resolve_run(args, output_dir))
    if checkpoint is None:
        cfg, state = load_config(args.config or DEFAULT_CONFIG, overrides), None
    else:
        state = load_checkpoint(checkpoint)
        cfg = load_config(args.config, overrides, base=_resumable(state["config"]))
        check_channels(state, cfg["train"]["channels"], "train.channels")
    check_values(cfg)
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(_resumable(cfg), sort_keys=False))
    return cfg, run_dir, state


def _resumable(cfg: dict) -> dict:
    """The config to continue from: a stop point belongs to one invocation, not to the run."""
    out = yaml.safe_load(yaml.safe_dump(cfg))
    out["train"]["stop_after_iters"] = None
    return out


def check_values(cfg: dict) -> None:
    """What the YAML types cannot say: ranges and combinations."""
    train, ibot, student = cfg["train"], cfg["ibot"], cfg["student"]
    if train["samples_per_field"] < 1:
        raise TrainerError(f"train.samples_per_field must be 1 or more, got {train['samples_per_field']}")
    if student["num_register_tokens"] < 0:
        raise TrainerError(f"student.num_register_tokens must be 0 or more, got {student['num_register_tokens']}")
    if not 0.0 <= student["drop_path_rate"] < 1.0:
        raise TrainerError(f"student.drop_path_rate must be in [0, 1), got {student['drop_path_rate']}")
    if ibot["loss_weight"] > 0:
        low_high = ibot["mask_ratio_min_max"]
        if len(low_high) != 2 or not 0.0 <= low_high[0] <= low_high[1] <= 1.0 or low_high[1] == 0:
            raise TrainerError(f"ibot.mask_ratio_min_max must be [min, max] with 0 <= min <= max <= 1 and max > 0, "
                               f"got {low_high}")
        if not 0.0 < ibot["mask_sample_probability"] <= 1.0:
            raise TrainerError(f"ibot.mask_sample_probability must be in (0, 1] (or set ibot.loss_weight=0), "
                               f"got {ibot['mask_sample_probability']}")


def build_optimizer(cfg: dict, model: SSLMetaArch) -> torch.optim.Optimizer:
    optim = cfg["optim"]
    return torch.optim.AdamW(model.get_params_groups(), betas=(optim["adamw_beta1"], optim["adamw_beta2"]))


def do_train(cfg: dict, run_dir: Path, state: dict | None, args) -> Path:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank = distributed.get_rank()
    torch.manual_seed(cfg["train"]["seed"])  # same initial weights on every rank
    model = SSLMetaArch(cfg, device)
    optimizer = build_optimizer(cfg, model)
    iteration, position = 0, DataPosition()
    if state is not None:
        iteration, position = _restore(model, optimizer, state, rank, distributed.get_world_size())
    model.wrap_distributed()
    if cfg["train"]["compile"]:
        model.compile_backbones()
    model.train()
    loop = TrainLoop(cfg, model, optimizer, device, run_dir, args)
    return loop.run(iteration, position)


def _restore(model: SSLMetaArch, optimizer, state: dict, rank: int, world_size: int) -> tuple[int, DataPosition]:
    try:
        model.student.load_state_dict(state["student"])
        model.teacher.load_state_dict(state["teacher"])
        model.dino_loss.load_state_dict(state["dino_loss"])
        model.ibot_patch_loss.load_state_dict(state["ibot_patch_loss"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise TrainerError(f"the checkpoint's model differs from this config's (student.*, dino.head_*, ibot.*, "
                           f"crops.global_crops_size changed?): {first}; resume with the run's values") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:
        raise TrainerError("the checkpoint's optimiser groups differ from this config's (optim.layerwise_decay, "
                           "optim.patch_embed_lr_mult, ibot.separate_head or ibot.loss_weight changed): resume "
                           "with the run's values") from None
    if state["world_size"] == world_size:
        set_rng_state(state["rng"][rank])
    else:  # another world size: fresh per-rank streams, still a function of (seed, rank, iteration)
        torch.manual_seed(step_seed(state["config"]["train"]["seed"], rank, state["iteration"]))
    return state["iteration"], DataPosition.from_dict(state["data"])


class TrainLoop:
    def __init__(self, cfg, model: SSLMetaArch, optimizer, device, run_dir: Path, args):
        self.cfg, self.model, self.optimizer, self.device, self.run_dir = cfg, model, optimizer, device, run_dir
        self.train_cfg = cfg["train"]
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.schedulers = build_schedulers(cfg, self.world_size)
        self.total_iters = cfg["optim"]["epochs"] * self.train_cfg["OFFICIAL_EPOCH_LENGTH"]
        stop = self.train_cfg["stop_after_iters"]
        self.stop_at = self.total_iters if stop is None else min(stop, self.total_iters)
        self.augment = make_augmentation(cfg)
        self.mask_generator = None
        if model.do_ibot:
            self.mask_generator = make_mask_generator(cfg["crops"]["global_crops_size"], cfg["student"]["patch_size"])
        self.log = None
        if distributed.is_main_process():
            wandb_run = make_wandb_run(not args.no_wandb, args.wandb_project, run_dir.name, run_dir, cfg)
            self.log = MetricLog(run_dir, self.total_iters, wandb_run)

    def run(self, iteration: int, position: DataPosition) -> Path:
        previous_handlers = self._install_preemption_handler()
        source = None
        try:
            source = make_source(self.cfg, self.rank, self.world_size)
            self._check_source(source)
            self.device_clahe = trainer_clahe_options(source)
            iteration = self._loop(source, iteration, position)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if source is not None:
                source.close()
            if self.log is not None:
                self.log.close()
                if self.log.wandb_run is not None:
                    self.log.wandb_run.finish()
        return self.run_dir

    def _install_preemption_handler(self) -> dict:
        """SIGTERM (torchrun, Slurm, Kubernetes) or SIGUSR1 (Slurm's warning): finish the step, checkpoint, stop.

        Returns the handlers it replaced (restored when the run ends: the trainer may run inside another program)."""
        self.preempted = False

        def request_stop(signum, frame) -> None:
            self.preempted = True

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _check_source(self, source) -> None:
        if source.batches_per_epoch == 0:
            raise TrainerError("the dataset yields no batch per rank: lower train.batch_size_per_gpu "
                               "or set train.drop_last=false")

    def _loop(self, source, iteration: int, position: DataPosition) -> int:
        batch_size = self.train_cfg["batch_size_per_gpu"]
        epoch, start, skip = resume_point(position, self.rank, self.world_size, batch_size, source.batches_per_epoch)
        while iteration < self.stop_at:
            request = time.perf_counter()
            for batch in source.epoch(epoch, start_batch=start):
                waited = time.perf_counter() - request
                batch, loss_scale = skip_trained(batch, skip)
                skip = 0
                next_position = after_batch(epoch, batch.index, source.batches_per_epoch, self.world_size, batch_size)
                metrics = self._step(batch, iteration, loss_scale)
                iteration += 1
                self._after_step(source, iteration, next_position, batch, metrics, request, waited)
                if iteration >= self.stop_at:
                    return iteration
                request = time.perf_counter()
            epoch, start = epoch + 1, 0
        return iteration

    def _step(self, batch, iteration: int, loss_scale: float = 1.0) -> dict:
        self._check_channels(batch.images)
        images = normalize_per_channel(images_to_device_with_clahe(batch.images, self.device, self.device_clahe))
        generator = step_generator(self.train_cfg["seed"], self.rank, iteration)
        crops = self.augment(images, generator, samples_per_field=self.train_cfg["samples_per_field"],
                             pixel_size_um=batch.pixel_size_um)
        del images
        if self.mask_generator is not None:
            ibot = self.cfg["ibot"]
            masks = collate_masks(crops["global_crops"].shape[0], self.mask_generator, ibot["mask_ratio_min_max"],
                                  ibot["mask_sample_probability"],
                                  step_numpy_rng(self.train_cfg["seed"], self.rank, iteration))
            crops.update({k: v.to(self.device, non_blocking=True) for k, v in masks.items()})
        values = {name: s[iteration] for name, s in self.schedulers.items()}
        apply_optim_scheduler(self.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model.forward_backward(crops, values["teacher_temp"], loss_scale)
        self._clip_and_freeze(values["last_layer_lr"])
        self.optimizer.step()
        self.model.update_teacher(values["momentum"])
        if self.log is not None and _every(self.train_cfg["image_log_freq"], iteration):
            for name, images in _preview(crops).items():
                self.log.log_images(name, images, iteration)
        return {**values, **distributed.reduce_mean(losses)}

    def _clip_and_freeze(self, last_layer_lr: float) -> None:
        if self.cfg["optim"]["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.student.parameters(), self.cfg["optim"]["clip_grad"])
        if last_layer_lr == 0.0:
            # A frozen last layer must not move at all, weight decay included: drop its gradient.
            for name, p in self.model.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None

    def _check_channels(self, images) -> None:
        channels = self.train_cfg["channels"]
        if images.shape[1] != len(channels):
            raise TrainerError(f"the dataset gives {images.shape[1]} channels per field but train.channels "
                               f"lists {len(channels)} ({', '.join(channels)})")

    def _after_step(self, source, iteration, position: DataPosition, batch, metrics, request, waited) -> None:
        step_s = time.perf_counter() - request
        every = _every(self.train_cfg["log_freq"], iteration) or iteration == self.stop_at
        if self.log is not None and every:
            self.log.log(self._metrics(source, iteration, position, batch, metrics, step_s, waited))
        if distributed.any_rank(self.preempted) and iteration < self.stop_at:
            self.stop_at = iteration
            if self.log is not None:
                print(f"preempted: checkpoint saved at iteration {iteration}; continue with --resume", flush=True)
        if iteration % self.train_cfg["saveckp_freq"] == 0 or iteration == self.stop_at:
            self._save(iteration, position)

    def _metrics(self, source, iteration, position: DataPosition, batch, metrics, step_s, waited) -> dict:
        fields = len(batch.ids) * self.world_size
        out = {"iteration": iteration, "epoch": (iteration - 1) // self.train_cfg["OFFICIAL_EPOCH_LENGTH"],
               "data_epoch": batch.epoch, "batch_index": batch.index, "data_samples": position.samples, **metrics,
               "samples_per_s": fields * self.train_cfg["samples_per_field"] / step_s,
               "fields_per_s": fields / step_s, "step_s": step_s, "data_wait_s": waited,
               "data_wait_share": waited / step_s, "first_id": batch.ids[0]}
        status = source.status() or {}
        for key in ("hit_rate", "fetch_mb_per_s"):
            if key in status:
                out[f"daemon_{key}"] = status[key]
        return out

    def _save(self, iteration: int, position: DataPosition) -> None:
        rng = distributed.all_gather_object(get_rng_state())
        if not distributed.is_main_process():
            return
        model = self.model
        save_checkpoint(self.run_dir, {
            "student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "dino_loss": model.dino_loss.state_dict(), "ibot_patch_loss": model.ibot_patch_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(), "iteration": iteration, "data": position.as_dict(),
            "rng": rng, "world_size": self.world_size, "channels": list(self.train_cfg["channels"]),
            "in_chans": in_chans_for(self.cfg), "config": self.cfg,
        })


def skip_trained(batch, skip: int):
    """(batch without its first `skip` samples, loss scale). A rank whose whole first batch after an elastic
    resume was already trained on still takes part in the step (DDP needs every rank), with loss scale 0."""
    if skip == 0:
        return batch, 1.0
    if skip >= len(batch.ids):
        return batch, 0.0
    pixel_size_um = None if batch.pixel_size_um is None else batch.pixel_size_um[skip:]
    return replace(batch, ids=batch.ids[skip:], images=batch.images[skip:], pixel_size_um=pixel_size_um), 1.0


def _every(freq: int, iteration: int) -> bool:
    return freq > 0 and iteration % freq == 0


def _preview(crops: dict, n_local: int = 4) -> dict[str, list]:
    """First sample's views as [0, 1] images (channel mean when there are several channels)."""
    B = crops["global_crops"].shape[0] // crops["n_global"]
    views = {"crops/global": [crops["global_crops"][i * B] for i in range(crops["n_global"])]}
    if crops["local_crops"] is not None:
        views["crops/local"] = [crops["local_crops"][i * B] for i in range(min(n_local, crops["n_local"]))]
    return {name: [_to_unit(view) for view in group] for name, group in views.items()}


def _to_unit(view: torch.Tensor):
    img = view.float().mean(0)
    return ((img - img.min()) / (img.max() - img.min() + 1e-6)).cpu().numpy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_intermixed_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: a bare --resume followed by an override, not a run called "key=value"
        args.opts.insert(0, args.resume)
        args.resume = ""
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        distributed.enable_distributed()
        cfg, run_dir, state = setup(args)
        do_train(cfg, run_dir, state, args)
        if distributed.is_main_process():
            print(f"log: {run_dir / 'logs' / 'log.txt'}\ncheckpoint: {find_checkpoint(run_dir)}")
        return 0
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PrefetchdError as exc:
        print(f"error: prefetchd: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
