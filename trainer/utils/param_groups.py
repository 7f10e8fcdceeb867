from torch import nn


def get_params_groups(model: nn.Module) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings; the head's last layer is
    its own group so it can be frozen early in training."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith((".bias", "pos_embed", "cls_token"))
        last_layer = "last_layer" in name
        groups.setdefault((no_decay, last_layer), []).append(param)
    return [
        {"params": params, "wd_multiplier": 0.0 if no_decay else 1.0, "is_last_layer": last_layer}
        for (no_decay, last_layer), params in sorted(groups.items())
    ]
