import math

from trainer.utils.schedules import CosineScheduler


def global_batch_size(cfg: dict, world_size: int) -> int:
    """Crop sets per optimiser step over all ranks (fields × samples_per_field × ranks)."""
    train = cfg["train"]
    return train["batch_size_per_gpu"] * train["samples_per_field"] * world_size


def scaled_lr(cfg: dict, world_size: int) -> float:
    """`optim.base_lr` scaled to the global batch by `optim.scaling_rule` (DINOv2: sqrt_wrt_1024)."""
    batch = global_batch_size(cfg, world_size)
    rule, base_lr = cfg["optim"]["scaling_rule"], cfg["optim"]["base_lr"]
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch / 1024)
    if rule == "linear_wrt_256":
        return base_lr * batch / 256
    return base_lr


def build_schedulers(cfg: dict, world_size: int) -> dict[str, CosineScheduler]:
    optim, teacher = cfg["optim"], cfg["teacher"]
    epoch_len = cfg["train"]["OFFICIAL_EPOCH_LENGTH"]
    total = optim["epochs"] * epoch_len
    lr = dict(base_value=scaled_lr(cfg, world_size), final_value=optim["min_lr"], total_iters=total,
              warmup_iters=optim["warmup_epochs"] * epoch_len)
    return {
        "lr": CosineScheduler(**lr),
        "last_layer_lr": CosineScheduler(**lr, freeze_iters=optim["freeze_last_layer_epochs"] * epoch_len),
        "wd": CosineScheduler(optim["weight_decay"], optim["weight_decay_end"], total),
        "momentum": CosineScheduler(teacher["momentum_teacher"], teacher["final_momentum_teacher"], total),
        "teacher_temp": CosineScheduler(
            teacher["teacher_temp"], teacher["teacher_temp"], total,
            warmup_iters=teacher["warmup_teacher_temp_epochs"] * epoch_len,
            start_warmup_value=teacher["warmup_teacher_temp"],
        ),
    }


def apply_optim_scheduler(optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
