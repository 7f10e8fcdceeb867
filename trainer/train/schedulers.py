import math

from trainer.utils.schedules import CosineScheduler


def scaled_lr(cfg: dict, world_size: int) -> float:
    batch = cfg["train"]["batch_size_per_gpu"] * world_size
    rule = cfg["optim"]["scaling_rule"]
    if rule == "sqrt_wrt_1024":
        return cfg["optim"]["lr"] * math.sqrt(batch / 1024)
    if rule == "linear_wrt_256":
        return cfg["optim"]["lr"] * batch / 256
    return cfg["optim"]["lr"]


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
        group["lr"] = last_layer_lr if group["is_last_layer"] else lr
