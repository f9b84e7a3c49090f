"""One AdamW per parameter group, each with its own warm-up + half-cosine schedule.

The visual and language groups are trained on different data (docs/METHOD.md §4), so each
has its own optimizer, learning rate, weight decay and step counter: a caption step advances
only the visual schedule. Defaults follow the released code (docs/METHOD.md §5): betas
(0.9, 0.95), weight decay where the parameter's declaration says so (matrices; not biases and
1-D parameters), lr = base_lr * batch / 256.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llama_adapter_v2.config.schema import GroupOptimConfig, TrainingConfig
from llama_adapter_v2.model.sharding import full_tensor
from llama_adapter_v2.model.trainable import AdapterParameter


@dataclass(frozen=True)
class WarmupHalfCosine:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then half a cosine down to ``floor``."""

    peak: float
    warmup: int
    total: int
    floor: float = 0.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class GroupStepStats:
    """What one optimizer step of a group reports to tracking."""

    lr: float
    grad_norm: float
    param_norm: float | None = None
    update_ratio: float | None = None


def effective_batch(training: TrainingConfig, world_size: int) -> int:
    return training.batch_size * training.grad_accum * world_size


def peak_lr(group: GroupOptimConfig, training: TrainingConfig, world_size: int) -> float:
    """base_lr, scaled linearly to the effective batch when ``training.scale_lr`` (MAE/MM rule)."""
    if not training.scale_lr:
        return group.base_lr
    return group.base_lr * effective_batch(training, world_size) / 256


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm as a plain tensor, also of an FSDP2 DTensor shard (then all ranks must call it)."""
    return full_tensor(tensor.float().norm())


def _param_norm(params: list[nn.Parameter]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([_norm(p.detach()) for p in params])))


@dataclass
class GroupOptimizer:
    """AdamW + schedule + step counter for one parameter group."""

    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    schedule: WarmupHalfCosine
    grad_clip: float | None
    steps_taken: int = 0
    _snapshot: list[torch.Tensor] = field(default_factory=list, repr=False)

    def current_lr(self) -> float:
        return self.schedule.lr_at(self.steps_taken)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler | None = None, *, measure: bool = False) -> GroupStepStats:
        """Set the scheduled lr, unscale, clip, step; ``measure`` adds norms (costs a copy)."""
        lr = self.current_lr()
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        limit = self.grad_clip if self.grad_clip is not None else math.inf
        # over DTensor gradients (FSDP2) clip_grad_norm_ reduces across ranks and gives a DTensor
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, limit)))
        before = [p.detach().clone() for p in self.params] if measure else []
        if scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        self.steps_taken += 1
        stats = GroupStepStats(lr=lr, grad_norm=grad_norm)
        if measure:
            stats.param_norm = _param_norm(self.params)
            moved = [_norm(p.detach() - b) for p, b in zip(self.params, before, strict=True)]
            update = torch.stack(moved)
            stats.update_ratio = float(torch.linalg.vector_norm(update)) / max(stats.param_norm, 1e-12)
        return stats


def build_group_optimizer(
    name: str,
    declared: Sequence[AdapterParameter],
    group_cfg: GroupOptimConfig,
    training: TrainingConfig,
    *,
    total_steps: int,
    world_size: int = 1,
) -> GroupOptimizer:
    """AdamW with a decay and a no-decay parameter group; lr is set per step by the schedule.

    ``foreach=True``: a group is many small tensors (141 in the language group: a bias and a
    scale per linear, norms, prompts, gates), and on CPU torch defaults to the single-tensor
    AdamW, ~10 kernels per tensor per step; the multi-tensor path batches them (measured 46 ->
    5 ms per step for the language group's shapes on the bench CPU). Bits may differ from the
    single-tensor path in the last place, so a resumed run must use the same implementation:
    the flag is saved with the param groups and restored with them.
    """
    if not declared:
        raise ValueError(f"parameter group {name!r} is empty: nothing to optimise")
    decay = [p.parameter for p in declared if p.trainable.decays]
    no_decay = [p.parameter for p in declared if not p.trainable.decays]
    param_groups = [
        {"params": decay, "weight_decay": group_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    peak = peak_lr(group_cfg, training, world_size)
    optimizer = torch.optim.AdamW(
        [g for g in param_groups if g["params"]], lr=peak, betas=tuple(group_cfg.betas), eps=group_cfg.eps,
        foreach=True,
    )
    schedule = WarmupHalfCosine(
        peak=peak, warmup=group_cfg.warmup_steps, total=max(1, total_steps), floor=group_cfg.min_lr
    )
    return GroupOptimizer(
        name=name, params=[p.parameter for p in declared], optimizer=optimizer, schedule=schedule,
        grad_clip=training.grad_clip,
    )


@dataclass(frozen=True)
class Precision:
    """Autocast and loss scaling for one run: fp32 (CPU default), bf16 autocast, fp16 + scaler."""

    device_type: str
    mode: str

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.mode == "fp16" else None

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Storage dtype of the frozen base and tower.

        Under autocast every matmul runs in half precision anyway, so an fp32 copy of a frozen
        7B base would only double its memory and add a cast per op and step.
        """
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]


def keep_trainable_in_fp32(declared: Sequence[AdapterParameter]) -> None:
    """Trainable tensors stay fp32 whatever the base's dtype: AdamW updates of 1e-4 relative
    size vanish in bf16's 8-bit mantissa."""
    for parameter in declared:
        parameter.parameter.data = parameter.parameter.data.float()
