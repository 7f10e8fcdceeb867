from trainer.models.vision_transformer import ARCHS, VisionTransformer, vit


def in_chans_for(cfg: dict) -> int:
    """channel_as_view feeds one channel (or the channel mean) per view; all_channels feeds them all."""
    return 1 if cfg["train"]["multiview_mode"] == "channel_as_view" else len(cfg["train"]["channels"])


def build_model_from_cfg(cfg: dict) -> VisionTransformer:
    student = cfg["student"]
    return vit(
        student["arch"],
        img_size=cfg["crops"]["global_crops_size"],
        patch_size=student["patch_size"],
        in_chans=in_chans_for(cfg),
        drop_path_rate=student["drop_path_rate"],
        drop_path_uniform=student["drop_path_uniform"],
        init_values=student["layerscale"],
        num_register_tokens=student["num_register_tokens"],
    )
