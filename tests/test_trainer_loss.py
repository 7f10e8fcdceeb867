"""DINO class-token loss, iBOT masked-patch loss, Sinkhorn-Knopp and KoLeo: values on fixed inputs against
hand-written formulas, gradients against the analytic cross-entropy gradient, SK across two gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import load_config
from trainer.data.collate import collate_masks
from trainer.data.masking import make_mask_generator
from trainer.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp
from trainer.train.ssl_meta_arch import SSLMetaArch


def cross_entropy(target: list[float], logits: list[float], temp: float) -> float:
    """−Σ_k t_k log softmax(z / temp)_k written out with math.exp / math.log."""
    z = [v / temp for v in logits]
    log_norm = math.log(sum(math.exp(v) for v in z))
    return -sum(t * (v - log_norm) for t, v in zip(target, z))


S1, S2 = [0.2, 0.0, -0.1], [-0.3, 0.4, 0.1]
T1, T2 = [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]


def test_dino_loss_sums_the_batch_mean_cross_entropy_of_every_pair():
    loss = DINOLoss(out_dim=3, student_temp=0.1)
    student = [torch.tensor([S1, S2]), torch.tensor([S2, S1])]
    teacher = [torch.tensor([T1, T2]), torch.tensor([T2, T2])]
    value = loss(student, teacher).item()
    expected = sum(
        (cross_entropy(t_rows[0], s_rows[0], 0.1) + cross_entropy(t_rows[1], s_rows[1], 0.1)) / 2
        for s_rows in ([S1, S2], [S2, S1]) for t_rows in ([T1, T2], [T2, T2])
    )
    assert value == pytest.approx(expected, rel=1e-6)


def test_centering_subtracts_the_center_before_the_sharpened_softmax():
    loss = DINOLoss(out_dim=3)
    loss.center.copy_(torch.tensor([[0.1, -0.2, 0.0]]))
    targets = loss.softmax_center_teacher(torch.tensor([S1]), teacher_temp=0.05)[0].tolist()
    z = [(s - c) / 0.05 for s, c in zip(S1, [0.1, -0.2, 0.0])]
    expected = [math.exp(v) / sum(math.exp(w) for w in z) for v in z]
    assert targets == pytest.approx(expected, rel=1e-6)
    loss.update_center(torch.tensor([S1, S2]))  # center ← 0.9 · center + 0.1 · batch mean
    mean = [(a + b) / 2 for a, b in zip(S1, S2)]
    assert loss.center[0].tolist() == pytest.approx([0.9 * c + 0.1 * m for c, m in zip([0.1, -0.2, 0.0], mean)])


def test_dino_loss_gradient_is_softmax_minus_target_over_temperature():
    loss = DINOLoss(out_dim=3, student_temp=0.1)
    s = torch.tensor([S1, S2], requires_grad=True)
    t = torch.tensor([T1, T2])
    loss([s], [t]).backward()
    expected = (torch.softmax(torch.tensor([S1, S2]) / 0.1, dim=-1) - t) / (0.1 * 2)
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_ibot_loss_averages_masked_patches_per_image_then_over_all_images():
    loss = iBOTPatchLoss(patch_out_dim=3, student_temp=0.1)
    masks = torch.tensor([[True, True, False], [False, False, False]])  # image 1 has no masked patch
    weights = torch.tensor([0.5, 0.5])  # 1 / masked patches of image 0
    s = torch.tensor([S1, S2], requires_grad=True)
    t = torch.tensor([T1, T2])
    value = loss.forward_masked(s, t, masks, weights)
    expected = (cross_entropy(T1, S1, 0.1) + cross_entropy(T2, S2, 0.1)) / 2 / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    grad = (torch.softmax(torch.tensor([S1, S2]) / 0.1, dim=-1) - t) / 0.1 * 0.5 / 2
    assert torch.allclose(s.grad, grad, atol=1e-6)


def test_ibot_center_is_an_ema_of_the_mean_masked_patch_output():
    loss = iBOTPatchLoss(patch_out_dim=3, center_momentum=0.9)
    loss.update_center(torch.tensor([S1, S2]))
    assert loss.center[0, 0].tolist() == pytest.approx([0.1 * (a + b) / 2 for a, b in zip(S1, S2)])
    before = loss.center.clone()
    loss.update_center(torch.zeros(0, 3))  # no masked patch this step: no update
    assert torch.equal(loss.center, before)


def test_sinkhorn_knopp_rows_are_assignments_and_prototypes_balance():
    scores = torch.tensor([[0.9, 0.1, -0.3, 0.2], [0.8, 0.0, -0.2, 0.1], [0.7, 0.3, 0.1, -0.1],
                           [0.6, -0.4, 0.2, 0.0], [0.5, 0.2, 0.0, 0.3], [0.9, -0.1, 0.3, 0.1]])
    q = sinkhorn_knopp(scores, teacher_temp=0.1)
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-6)  # every sample's weights sum to 1
    converged = sinkhorn_knopp(scores, teacher_temp=0.1, n_iterations=200)
    assert torch.allclose(converged.sum(0), torch.full((4,), 6 / 4), atol=1e-4)  # every prototype gets B/K
    # A plain softmax gives prototype 0 most of the mass; SK spreads it.
    softmax_mass = torch.softmax(scores / 0.1, dim=-1).sum(0)
    assert softmax_mass[0] > 4 and q.sum(0)[0] < softmax_mass[0] / 2


def test_sinkhorn_knopp_removes_per_sample_and_per_prototype_offsets():
    # exp((r_b + c_k) / T) is rank one: balancing it gives the uniform assignment 1/K exactly.
    rows, cols = torch.tensor([0.3, -0.5, 0.9]), torch.tensor([0.4, -0.2, 0.0, 0.7, -0.9])
    q = sinkhorn_knopp(rows[:, None] + cols[None, :], teacher_temp=0.07)
    assert torch.allclose(q, torch.full((3, 5), 1 / 5), atol=1e-6)
    # and it is finite where exp(score / T) alone would overflow float32
    assert torch.isfinite(sinkhorn_knopp(torch.tensor([[100.0, 0.0], [0.0, 100.0]]), teacher_temp=0.04)).all()


def test_koleo_is_minus_log_nearest_neighbour_distance():
    koleo = KoLeoLoss()
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo(square).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]])
    assert koleo(square) < koleo(clustered)
    assert koleo(torch.randn(1, 8)).item() == 0.0


def _ranked_sinkhorn(rank: int, world_size: int, init_file: str, chunks, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = sinkhorn_knopp(chunks[rank], teacher_temp=0.1)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    scores = torch.rand(8, 5) * 2 - 1
    chunks = [scores[:3], scores[3:]]  # unequal shares, as after an elastic resume or for iBOT patches
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ranked_sinkhorn, args=(2, str(tmp_path / "store"), chunks, results), nprocs=2)
        together = torch.cat([results[0], results[1]])
    assert torch.allclose(together, sinkhorn_knopp(scores, teacher_temp=0.1), atol=1e-6)


def _tiny(*extra: str):
    cfg = load_config(None, ["train.dataset_path=Synthetic", "student.arch=vit_pico", "crops.global_crops_size=32",
                             "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=40",
                             "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8", "ibot.head_n_prototypes=24",
                             "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8", *extra])
    torch.manual_seed(0)
    return cfg, SSLMetaArch(cfg, torch.device("cpu"))


def _crops(B: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    crops = {"global_crops": torch.randn(2 * B, 1, 32, 32, generator=g),
             "local_crops": torch.randn(2 * B, 1, 16, 16, generator=g), "n_global": 2, "n_local": 2}
    crops.update(collate_masks(2 * B, make_mask_generator(32, 8), (0.1, 0.5), 0.5, np.random.default_rng(seed)))
    return crops


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [False, True])
def test_uniform_heads_give_log_k_per_term(centering, separate_head):
    """With the heads' last layers at zero every output is uniform: each cross-entropy is log K, so the DINO loss
    (averaged over its 2·1 + 2·2 view pairs) is log K and the iBOT loss is (masked images / images) · log K'."""
    cfg, model = _tiny(f"train.centering={centering}", f"ibot.separate_head={str(separate_head).lower()}")
    for net in (model.student, model.teacher):
        for name, p in net.named_parameters():
            if "last_layer" in name:
                p.data.zero_()
    crops = _crops()
    losses = model.forward_backward(crops, teacher_temp=0.04)
    assert losses["dino_loss"].item() == pytest.approx(math.log(40), rel=1e-5)
    k_ibot = 24 if separate_head else 40
    masked_share = (crops["masks"].sum(1) > 0).float().mean().item()
    assert masked_share == 0.5
    assert losses["ibot_loss"].item() == pytest.approx(masked_share * math.log(k_ibot), rel=1e-5)


def test_every_part_of_the_student_gets_a_gradient_and_the_teacher_none():
    cfg, model = _tiny("ibot.separate_head=true", "student.num_register_tokens=2", "train.centering=sinkhorn_knopp")
    losses = model.forward_backward(_crops(), teacher_temp=0.04)
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "dino_loss", "koleo_loss", "ibot_loss",
                           "loss"}
    for name, p in model.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.teacher.parameters())
    ibot_off = _tiny("ibot.loss_weight=0")[1]
    losses = ibot_off.forward_backward(_crops(), teacher_temp=0.04)
    assert "ibot_loss" not in losses and ibot_off.student.backbone.mask_token.grad is None


def test_loss_scale_zero_contributes_no_gradient():
    cfg, model = _tiny()
    model.forward_backward(_crops(), teacher_temp=0.04, loss_scale=0.0)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student.parameters())
