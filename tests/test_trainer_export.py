"""`python -m trainer.export`: the teacher backbone loads into timm's VisionTransformer with no missing key and
computes the same embedding as the trainer's backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.export import main as export_main
from trainer.train.ssl_meta_arch import SSLMetaArch
from trainer.utils.checkpoint import save_checkpoint


def import_timm():
    """timm imports torchvision. PyPI's torchvision wheels are CUDA builds; beside the CPU-only torch of a
    machine without a GPU its C ops cannot load, and its import then fails while registering fake kernels
    for two of them (nms, qnms). timm never calls them: declaring their schemas lets the import finish."""
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already defined
        import timm
    return timm


def _checkpoint(tmp_path, *overrides: str):
    cfg = load_config(None, ["train.dataset_path=Synthetic", "student.arch=vit_pico", "crops.global_crops_size=32",
                             "dino.head_n_prototypes=32", "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8",
                             *overrides])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg, torch.device("cpu"))
    with torch.no_grad():  # trained-looking weights: no parameter left at its (often constant) init
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path / "run"
    save_checkpoint(run, {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                          "optimizer": {}, "iteration": 7, "data": {"epoch": 0, "samples": 0},
                          "channels": list(cfg["train"]["channels"]), "config": cfg, "world_size": 1})
    return run, model.teacher.backbone.eval(), cfg


@pytest.mark.parametrize("overrides", [
    ("student.num_register_tokens=0", "student.layerscale=0"),
    ("student.num_register_tokens=4", "student.layerscale=1e-5"),
    ("student.num_register_tokens=2", "train.multiview_mode=all_channels"),
])
def test_exported_teacher_loads_into_timm_with_every_key_and_the_same_output(tmp_path, capsys, overrides):
    timm = import_timm()
    run, backbone, cfg = _checkpoint(tmp_path, *overrides)
    assert export_main(["--checkpoint", str(run)]) == 0
    out = run / "export"
    printed = capsys.readouterr().out
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in printed

    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(torch.load(out / "model.pth", weights_only=True))
    config = json.loads((out / "config.json").read_text())
    args = config["model_args"]
    strict = timm.create_model(config["architecture"], pretrained=False, **args)
    result = strict.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    by_file = timm.create_model(config["architecture"], pretrained=True, **args,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0)).eval()
    for model in (by_dir, by_file):
        assert type(model).__name__ == "VisionTransformer" and model.num_reg_tokens == cfg["student"]["num_register_tokens"]
        loaded = model.state_dict()
        assert set(loaded) == set(weights)  # nothing missing, nothing extra
        for key, value in weights.items():
            assert torch.equal(loaded[key], value), key

    x = torch.randn(3, args["in_chans"], 32, 32)
    with torch.no_grad():
        ours = backbone(x)
        assert torch.allclose(by_dir(x), ours, atol=1e-5)
        assert torch.allclose(by_file(x), ours, atol=1e-5)
        # the patch tokens agree too (registers and class token in front, as the trainer orders them)
        features = by_dir.forward_features(x)
        assert torch.allclose(features[:, by_dir.num_prefix_tokens:],
                              backbone(x, is_training=True)["x_norm_patchtokens"], atol=1e-5)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
