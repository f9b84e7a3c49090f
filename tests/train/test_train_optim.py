"""Per-group AdamW: decay split, warm-up + half-cosine values, lr scaling, clipping report."""

from __future__ import annotations

import math

import pytest
import torch

from llama_adapter_v2.config.schema import GroupOptimConfig, TrainingConfig
from llama_adapter_v2.model.trainable import AdapterParameter, Trainable
from llama_adapter_v2.train.optim import WarmupHalfCosine, build_group_optimizer, peak_lr

MATRIX = Trainable("language", "lora", decays=True)
VECTOR = Trainable("language", "bias", decays=False)


def test_schedule_warms_up_linearly_then_follows_half_a_cosine() -> None:
    schedule = WarmupHalfCosine(peak=1.0, warmup=4, total=14, floor=0.1)
    assert [schedule.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.lr_at(4) == 1.0
    assert schedule.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert schedule.lr_at(14) == pytest.approx(0.1)
    assert schedule.lr_at(100) == pytest.approx(0.1)


def test_lr_scales_with_the_effective_batch() -> None:
    group = GroupOptimConfig(base_lr=1e-3)
    training = TrainingConfig(batch_size=4, grad_accum=2, scale_lr=True)
    assert peak_lr(group, training, world_size=2) == 1e-3 * 16 / 256
    assert peak_lr(group, training.model_copy(update={"scale_lr": False}), world_size=2) == 1e-3


def test_weight_decay_goes_where_the_declaration_says() -> None:
    matrix = torch.nn.Parameter(torch.ones(3, 3))
    bias, norm = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    training = TrainingConfig(grad_clip=None)
    declared = [AdapterParameter("a.weight", matrix, MATRIX), AdapterParameter("a.bias", bias, VECTOR),
                AdapterParameter("n.weight", norm, Trainable("language", "norm", decays=False))]
    group = build_group_optimizer(
        "visual", declared, GroupOptimConfig(base_lr=0.1, weight_decay=0.5), training, total_steps=10,
    )
    decayed, plain = group.optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and decayed["params"] == [matrix]
    assert plain["weight_decay"] == 0.0 and plain["params"] == [bias, norm]
    assert decayed["betas"] == (0.9, 0.95)


def test_step_reports_the_norm_before_clipping_and_clips_to_the_limit() -> None:
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    weight.grad = torch.full((2, 2), 3.0)  # norm 6
    training = TrainingConfig(grad_clip=1.0, scale_lr=False)
    group = build_group_optimizer("language", [AdapterParameter("w", weight, MATRIX)],
                                  GroupOptimConfig(base_lr=0.5, warmup_steps=2), training, total_steps=4)
    stats = group.step(measure=True)
    assert stats.grad_norm == pytest.approx(6.0)
    assert stats.lr == 0.25  # first warm-up step of two
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    # AdamW's first step moves every entry by lr (sign of the gradient): update norm 0.25 * 2
    assert stats.param_norm == pytest.approx(0.5, rel=1e-5)
    assert stats.update_ratio == pytest.approx(1.0, rel=1e-5)
    assert group.steps_taken == 1 and math.isclose(group.current_lr(), 0.5)


def test_groups_use_the_multi_tensor_adamw_and_it_matches_the_single_tensor_update() -> None:
    """foreach batches the per-tensor kernels; the update is AdamW's to float rounding."""
    torch.manual_seed(0)
    named = [(f"l{i}.bias", torch.nn.Parameter(torch.randn(7))) for i in range(5)]
    named.append(("l.lora_a", torch.nn.Parameter(torch.randn(3, 7))))
    twins = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    cfg = GroupOptimConfig(base_lr=0.1, weight_decay=0.05, warmup_steps=1)
    training = TrainingConfig(grad_clip=None, scale_lr=False)
    declared = [AdapterParameter(name, p, MATRIX if p.ndim == 2 else VECTOR) for name, p in named]
    group = build_group_optimizer("language", declared, cfg, training, total_steps=3)
    assert [g["foreach"] for g in group.optimizer.param_groups] == [True, True]
    single = torch.optim.AdamW([{"params": twins[5:], "weight_decay": 0.05},
                                {"params": twins[:5], "weight_decay": 0.0}],
                               lr=0.1, betas=(0.9, 0.95), eps=cfg.eps, foreach=False)
    for step in range(3):
        grads = [torch.randn_like(p) for _, p in named]
        for (_, p), twin, grad in zip(named, twins, grads, strict=True):
            p.grad, twin.grad = grad.clone(), grad.clone()
        for g in single.param_groups:
            g["lr"] = group.current_lr()
        group.step()
        single.step()
        moved = [float((p.detach() - t.detach()).abs().max()) for (_, p), t in zip(named, twins, strict=True)]
        assert max(moved) < 1e-6, (step, moved)
    assert not torch.equal(named[0][1], torch.zeros(7))
