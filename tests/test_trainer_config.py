"""Training config: defaults ← file ← key=value, every key validated."""

from pathlib import Path

import pytest

from trainer.config import load_config, main as config_main
from trainer.errors import TrainerError

REPO = Path(__file__).resolve().parent.parent
MULTIVIEW = REPO / "configs" / "dinov3_vits8_jump_s3_multiview.yaml"


def test_multiview_config_has_the_dinov2_keys_and_the_s3_block():
    cfg = load_config(MULTIVIEW)
    assert cfg["student"]["arch"] == "vit_small" and cfg["student"]["patch_size"] == 8
    assert cfg["train"]["dataset_path"].startswith("JUMPS3MultiView:bucket=cellpainting-gallery")
    for key in ("batch_size_per_gpu", "OFFICIAL_EPOCH_LENGTH", "num_workers"):
        assert key in cfg["train"]
    assert {"epochs", "base_lr", "scaling_rule", "layerwise_decay", "patch_embed_lr_mult"} <= set(cfg["optim"])
    assert cfg["crops"]["global_crops_size"] == 224 and cfg["crops"]["local_crops_number"] == 8
    assert {"cache_size", "num_workers", "prefetch_factor"} <= set(cfg["s3"])
    assert "about 200 five-channel fields" in MULTIVIEW.read_text()


def test_overrides_are_typed_and_applied_last():
    cfg = load_config(MULTIVIEW, ["optim.epochs=3", "optim.base_lr=1e-3", "train.channels=DNA,RNA",
                                  "crops.global_crops_scale=[0.5, 1.0]", "ibot.mask_ratio_min_max=[0.2,0.4]"])
    assert cfg["optim"]["epochs"] == 3 and cfg["optim"]["base_lr"] == pytest.approx(1e-3)
    assert cfg["ibot"]["mask_ratio_min_max"] == [0.2, 0.4]
    assert cfg["train"]["channels"] == ["DNA", "RNA"]
    assert cfg["crops"]["global_crops_scale"] == [0.5, 1.0]


@pytest.mark.parametrize("override, message", [
    ("optim.epochz=3", "accepted keys here: optim.epochs"),
    ("nope.x=1", "accepted keys here: "),
    ("optim.epochs=many", "optim.epochs must be a number"),
    ("train.multiview_mode=rgb", "must be one of channel_as_view, all_channels"),
    ("train.centering=mean", "train.centering must be one of centering, sinkhorn_knopp"),
    ("optim.lr=0.001", "set optim.base_lr instead"),
    ("optim.epochs", "is not key=value"),
])
def test_bad_overrides_name_what_to_change(override, message):
    with pytest.raises(TrainerError, match=message.replace("(", r"\(")):
        load_config(MULTIVIEW, [override])


def test_shipped_config_is_the_dinov2_recipe():
    cfg = load_config(MULTIVIEW)
    assert cfg["ibot"]["loss_weight"] > 0 and cfg["ibot"]["separate_head"] is True
    assert cfg["ibot"]["mask_sample_probability"] == 0.5 and cfg["ibot"]["mask_ratio_min_max"] == [0.1, 0.5]
    assert cfg["train"]["centering"] == "sinkhorn_knopp"
    assert cfg["optim"]["scaling_rule"] == "sqrt_wrt_1024" and cfg["optim"]["layerwise_decay"] == 0.9
    assert cfg["optim"]["patch_embed_lr_mult"] == 0.2 and cfg["optim"]["lr"] is None
    assert cfg["student"]["drop_path_rate"] > 0 and cfg["student"]["layerscale"] == 1e-5
    assert cfg["student"]["num_register_tokens"] == 4
    assert cfg["crops"]["global_crops_scale"] == [0.32, 1.0] and cfg["crops"]["local_crops_scale"] == [0.05, 0.32]


def test_missing_dataset_is_an_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  epochs: 1\n")
    with pytest.raises(TrainerError, match="missing config key train.dataset_path"):
        load_config(config)


def test_unknown_key_in_file_and_unreadable_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  batch_size: 4\n")
    with pytest.raises(TrainerError, match="unknown config key 'train.batch_size'.*train.batch_size_per_gpu"):
        load_config(config)
    with pytest.raises(TrainerError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_config_cli_prints_values_and_one_line_errors(capsys):
    assert config_main(["--config", str(MULTIVIEW), "--get", "s3.num_workers", "s3.num_workers=3"]) == 0
    assert capsys.readouterr().out.strip() == "3"
    assert config_main(["--config", str(MULTIVIEW), "s3.cache=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 's3.cache'") and err.count("\n") == 1
