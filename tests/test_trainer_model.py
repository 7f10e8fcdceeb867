"""ViT (registers, mask token, LayerScale, drop-path), heads, EMA teacher, layer-wise decay groups, schedules."""

import math

import pytest
import torch

from trainer.config import load_config
from trainer.errors import TrainerError
from trainer.layers.dino_head import DINOHead
from trainer.models import vit
from trainer.train.schedulers import apply_optim_scheduler, build_schedulers, scaled_lr
from trainer.train.ssl_meta_arch import SSLMetaArch
from trainer.utils.schedules import CosineScheduler


def test_vit_small_patch8_has_the_reference_size():
    model = vit("vit_small", img_size=224, patch_size=8, in_chans=1)
    assert model.embed_dim == 384 and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    assert model.pos_embed.shape == (1, 1 + 28 * 28, 384)
    assert 21e6 < sum(p.numel() for p in model.parameters()) < 22.5e6


@pytest.mark.parametrize("in_chans, size, registers", [(1, 32, 0), (5, 16, 4), (5, 40, 2)])
def test_vit_takes_any_crop_size_channel_count_and_registers(in_chans, size, registers):
    model = vit("vit_pico", img_size=32, patch_size=8, in_chans=in_chans, num_register_tokens=registers)
    out = model(torch.randn(3, in_chans, size, size), is_training=True)
    assert out["x_norm_clstoken"].shape == (3, 64)
    assert out["x_norm_regtokens"].shape == (3, registers, 64)
    assert out["x_norm_patchtokens"].shape == (3, (size // 8) ** 2, 64)
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, 64)


def test_registers_sit_after_the_class_token_without_position_embedding():
    model = vit("vit_pico", img_size=16, patch_size=8, in_chans=1, num_register_tokens=3)
    with torch.no_grad():
        model.register_tokens.normal_()
    x = torch.randn(2, 1, 16, 16)
    tokens = model.prepare_tokens_with_masks(x)
    assert tokens.shape == (2, 1 + 3 + 4, 64)
    assert torch.equal(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))
    assert torch.allclose(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, -1))
    patches = model.patch_embed(x) + model.pos_embed[:, 1:]
    assert torch.allclose(tokens[:, 4:], patches)


def test_masked_patches_enter_as_the_mask_token():
    model = vit("vit_pico", img_size=16, patch_size=8, in_chans=1)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 1, 16, 16)
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    tokens = model.prepare_tokens_with_masks(x, masks)[:, 1:]
    unmasked = model.prepare_tokens_with_masks(x)[:, 1:]
    expected_masked = model.mask_token + model.pos_embed[0, 1:]
    assert torch.allclose(tokens[0, 0], expected_masked[0]) and torch.allclose(tokens[0, 3], expected_masked[3])
    assert torch.equal(tokens[0, 1:3], unmasked[0, 1:3]) and torch.equal(tokens[1], unmasked[1])


def test_layerscale_and_drop_path_options():
    model = vit("vit_pico", img_size=16, patch_size=8, drop_path_rate=0.2, init_values=1e-5)
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((64,), 1e-5))
    assert [b.drop_path.p for b in model.blocks] == [0.0, 0.2]  # linear from 0 by default here
    uniform = vit("vit_pico", img_size=16, patch_size=8, drop_path_rate=0.2, drop_path_uniform=True, init_values=0)
    assert [b.drop_path.p for b in uniform.blocks] == [0.2, 0.2]
    assert isinstance(uniform.blocks[0].ls1, torch.nn.Identity)
    # Drop-path drops whole samples while training and is the identity in eval.
    block = uniform.blocks[0].drop_path
    x = torch.ones(2000, 3, 4)
    kept = (block(x)[:, 0, 0] != 0).float().mean().item()
    assert kept == pytest.approx(0.8, abs=0.05)
    assert torch.equal(block.eval()(x), x)


def test_dino_head_outputs_cosine_similarities():
    head = DINOHead(64, 100, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 100) and out.abs().max() <= 1.0 + 1e-5


def test_cosine_scheduler_freeze_warmup_and_end():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, freeze_iters=3)
    assert s[0] == s[2] == 0.0
    assert s[3] == 0.0 and s[7] == pytest.approx(1.0)
    assert s[8] == pytest.approx(1.0) and s[19] > 0.1 and s[19] == pytest.approx(0.1, abs=0.02)
    assert s[100] == 0.1


def test_schedules_follow_the_config_and_base_lr_scales_with_the_global_batch():
    cfg = load_config(None, ["train.dataset_path=Synthetic", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=4",
                             "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=2", "optim.base_lr=0.004",
                             "teacher.warmup_teacher_temp_epochs=1", "train.batch_size_per_gpu=64"])
    s = build_schedulers(cfg, world_size=4)
    assert scaled_lr(cfg, 4) == pytest.approx(0.004 * 0.5)  # sqrt(64 · 4 / 1024) = 1/2
    k4 = load_config(None, ["train.dataset_path=Synthetic", "optim.base_lr=0.004", "train.batch_size_per_gpu=64",
                            "train.samples_per_field=4"])
    assert scaled_lr(k4, 4) == pytest.approx(0.004)  # 64 fields × 4 crop sets × 4 ranks = 1024
    linear = load_config(None, ["train.dataset_path=Synthetic", "optim.base_lr=0.001",
                                "optim.scaling_rule=linear_wrt_256", "train.batch_size_per_gpu=32"])
    assert scaled_lr(linear, 2) == pytest.approx(0.001 * 64 / 256)
    assert s["lr"][10] == pytest.approx(scaled_lr(cfg, 4), rel=1e-6)
    assert s["last_layer_lr"][19] == 0.0 and s["last_layer_lr"][21] > 0
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][15] == pytest.approx(0.07)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][39] > 0.999
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][39] == pytest.approx(0.4, abs=0.01)


def test_optim_lr_is_refused_with_the_key_to_set_instead():
    with pytest.raises(TrainerError, match="optim.lr is computed from optim.base_lr.*set optim.base_lr instead"):
        load_config(None, ["train.dataset_path=Synthetic", "optim.lr=0.001"])


def _tiny_cfg(*extra):
    return load_config(None, ["train.dataset_path=Synthetic", "student.arch=vit_pico",
                              "crops.global_crops_size=16", "dino.head_n_prototypes=32",
                              "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8", "ibot.head_n_prototypes=24",
                              "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8", *extra])


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


def test_param_groups_apply_layerwise_decay_patch_embed_multiplier_and_no_decay_sets():
    model = SSLMetaArch(_tiny_cfg("optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2",
                                  "ibot.separate_head=true", "student.num_register_tokens=2"), torch.device("cpu"))
    groups = model.get_params_groups()
    by_id = {id(p): g for g in groups for p in g["params"]}
    backbone = model.student.backbone  # vit_pico: 2 blocks, so embeddings are layer 0 of 3
    lr = {name: by_id[id(p)]["lr_multiplier"] for name, p in backbone.named_parameters()}
    assert lr["cls_token"] == lr["pos_embed"] == lr["register_tokens"] == lr["mask_token"] == pytest.approx(0.5**3)
    assert lr["patch_embed.proj.weight"] == pytest.approx(0.5**3 * 0.2)
    assert lr["blocks.0.attn.qkv.weight"] == pytest.approx(0.5**2)
    assert lr["blocks.1.mlp.fc2.weight"] == pytest.approx(0.5)
    assert lr["norm.weight"] == 1.0
    for head in (model.student.dino_head, model.student.ibot_head):
        assert {by_id[id(p)]["lr_multiplier"] for p in head.parameters()} == {1.0}
        assert by_id[id(head.last_layer.weight)]["is_last_layer"]
    wd = {name: by_id[id(p)]["wd_multiplier"] for name, p in backbone.named_parameters()}
    for name in ("cls_token", "register_tokens", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                 "blocks.0.ls1.gamma", "norm.bias"):
        assert wd[name] == 0.0, name
    assert wd["blocks.0.attn.qkv.weight"] == wd["patch_embed.proj.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.student.parameters() if p.requires_grad])

    optimizer = torch.optim.AdamW(groups)
    apply_optim_scheduler(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert group_of[id(backbone.patch_embed.proj.weight)]["lr"] == pytest.approx(1e-3 * 0.5**3 * 0.2)
    assert group_of[id(backbone.blocks[1].attn.qkv.weight)]["weight_decay"] == pytest.approx(0.04)
    assert group_of[id(model.student.ibot_head.last_layer.weight)]["lr"] == 0.0


def test_mask_token_is_frozen_without_ibot():
    assert not SSLMetaArch(_tiny_cfg("ibot.loss_weight=0"), torch.device("cpu")).student.backbone.mask_token.requires_grad
    assert SSLMetaArch(_tiny_cfg(), torch.device("cpu")).student.backbone.mask_token.requires_grad
    with pytest.raises(TrainerError, match="nothing to train"):
        SSLMetaArch(_tiny_cfg("ibot.loss_weight=0", "dino.loss_weight=0"), torch.device("cpu"))
