"""ViT, DINO head and loss, KoLeo, schedules, EMA teacher, parameter groups."""

import math

import pytest
import torch

from trainer.config import load_config
from trainer.layers.dino_head import DINOHead
from trainer.loss import DINOLoss, KoLeoLoss
from trainer.models import vit
from trainer.train.schedulers import build_schedulers, scaled_lr
from trainer.train.ssl_meta_arch import SSLMetaArch
from trainer.utils.param_groups import get_params_groups
from trainer.utils.schedules import CosineScheduler


def test_vit_small_patch8_has_the_reference_size():
    model = vit("vit_small", img_size=224, patch_size=8, in_chans=1)
    assert model.embed_dim == 384 and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    assert model.pos_embed.shape == (1, 1 + 28 * 28, 384)
    assert 21e6 < sum(p.numel() for p in model.parameters()) < 22.5e6


@pytest.mark.parametrize("in_chans, size", [(1, 32), (5, 16), (5, 40)])
def test_vit_takes_any_crop_size_and_channel_count(in_chans, size):
    model = vit("vit_pico", img_size=32, patch_size=8, in_chans=in_chans)
    tokens = model.forward_features(torch.randn(3, in_chans, size, size))
    assert tokens.shape == (3, 1 + (size // 8) ** 2, 64)
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, 64)


def test_dino_head_outputs_cosine_similarities():
    head = DINOHead(64, 100, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 100) and out.abs().max() <= 1.0 + 1e-5


def test_dino_loss_is_cross_entropy_against_centred_sharpened_teacher():
    loss = DINOLoss(out_dim=10)
    teacher = torch.zeros(2 * 3, 10)  # uniform teacher → loss = log K for uniform students
    student = torch.zeros(4 * 3, 10)
    value = loss(student, teacher, n_global=2, n_crops=4, teacher_temp=0.04)
    assert value.item() == pytest.approx(math.log(10), rel=1e-6)
    confident = torch.zeros(4 * 3, 10)
    confident[:, 0] = 10.0
    assert loss(confident, teacher, 2, 4, 0.04) > value


def test_dino_center_is_an_ema_of_teacher_outputs():
    loss = DINOLoss(out_dim=4, center_momentum=0.9)
    loss.update_center(torch.ones(6, 4))
    assert torch.allclose(loss.center, torch.full((1, 4), 0.1))


def test_koleo_prefers_spread_features():
    koleo = KoLeoLoss()
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]])
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert koleo(spread) < koleo(clustered)
    assert koleo(torch.randn(1, 8)).item() == 0.0


def test_cosine_scheduler_freeze_warmup_and_end():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, freeze_iters=3)
    assert s[0] == s[2] == 0.0
    assert s[3] == 0.0 and s[7] == pytest.approx(1.0)
    assert s[8] == pytest.approx(1.0) and s[19] > 0.1 and s[19] == pytest.approx(0.1, abs=0.02)
    assert s[100] == 0.1


def test_schedules_follow_the_config():
    cfg = load_config(None, ["train.dataset_path=Synthetic", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=4",
                             "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=2",
                             "teacher.warmup_teacher_temp_epochs=1", "train.batch_size_per_gpu=64"])
    s = build_schedulers(cfg, world_size=4)
    assert scaled_lr(cfg, 4) == pytest.approx(cfg["optim"]["lr"] * math.sqrt(256 / 1024))
    assert s["lr"][10] == pytest.approx(scaled_lr(cfg, 4), rel=1e-6)
    assert s["last_layer_lr"][19] == 0.0 and s["last_layer_lr"][21] > 0
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][15] == pytest.approx(0.07)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][39] > 0.999
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][39] == pytest.approx(0.4, abs=0.01)


def _tiny_cfg(*extra):
    return load_config(None, ["train.dataset_path=Synthetic", "student.arch=vit_pico",
                              "crops.global_crops_size=16", "dino.head_n_prototypes=32",
                              "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8", *extra])


def test_teacher_is_an_ema_of_the_student():
    model = SSLMetaArch(_tiny_cfg(), torch.device("cpu"))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.75)
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_param_groups_skip_decay_on_norms_biases_tokens_and_isolate_last_layer():
    model = SSLMetaArch(_tiny_cfg(), torch.device("cpu"))
    groups = get_params_groups(model.student)
    by_id = {id(p): g for g in groups for p in g["params"]}
    backbone = model.student.backbone
    assert by_id[id(backbone.cls_token)]["wd_multiplier"] == 0.0
    assert by_id[id(backbone.blocks[0].norm1.weight)]["wd_multiplier"] == 0.0
    assert by_id[id(backbone.blocks[0].attn.qkv.weight)]["wd_multiplier"] == 1.0
    assert by_id[id(model.student.head.last_layer.weight)]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.student.parameters()))
