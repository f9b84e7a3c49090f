"""One optimizer step: ``grad_accum`` batches of the step's task, then a step of the groups it trains.

Gradients reach only the active groups (``set_trainable``), so the other group cannot move,
bit for bit, whatever its weight decay or momentum (docs/METHOD.md §4).
"""

from __future__ import annotations

import logging
import math

import torch

from llama_adapter_v2.infer.holdout import to_device
from llama_adapter_v2.model.trainable import Group
from llama_adapter_v2.train.distributed import all_reduce_sum, gradient_sync
from llama_adapter_v2.train.optim import GroupStepStats
from llama_adapter_v2.train.schedule import Task, active_groups
from llama_adapter_v2.train.trainer import Trainer

LOG = logging.getLogger(__name__)


def train_step(trainer: Trainer, *, measure: bool) -> dict[str, float]:
    """Run this step's task and update its groups; returns the step's metrics (``tokens`` included)."""
    task = trainer.schedule[trainer.step]
    groups = active_groups(task, trainer.training)
    trainer.model.set_trainable(groups)
    trainer.wrapped.train()
    loss_sum, truncated = _accumulate_gradients(trainer, task)
    stats = _step_groups(trainer, groups, measure)
    totals = all_reduce_sum(loss_sum, trainer.ctx)
    mean_loss = float(totals[0]) / (trainer.training.grad_accum * trainer.ctx.world_size)
    trainer.tokens_seen += int(totals[1])
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"{task} loss became {mean_loss} at step {trainer.step + 1}")
    trainer.step += 1
    _warn_truncation(trainer, task, truncated)
    samples = trainer.training.grad_accum * trainer.training.batch_size
    metrics = {f"loss/{task}": mean_loss, "tokens": float(totals[1]),
               f"data/truncated_fraction/{task}": truncated / samples}
    return metrics | _record(trainer, task, mean_loss, stats)


def _accumulate_gradients(trainer: Trainer, task: Task) -> tuple[torch.Tensor, int]:
    """Forward and backward ``grad_accum`` batches; ([sum of micro losses, tokens], truncated samples)."""
    training = trainer.training
    loss_sum = torch.zeros(2, dtype=torch.float64)
    truncated = 0
    for micro in range(training.grad_accum):
        batch = to_device(trainer.streams[task].next_batch(), trainer.ctx.device)
        truncated += batch.get("truncated", 0)
        last = micro == training.grad_accum - 1
        with gradient_sync(trainer.wrapped, enabled=last):  # the backward too: FSDP2 reads it there
            with trainer.precision.autocast():
                loss = trainer.wrapped(
                    batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                    batch.get("has_image"),
                )
            scaled = loss / training.grad_accum
            (trainer.scaler.scale(scaled) if trainer.scaler is not None else scaled).backward()
        tokens = float(batch["attention_mask"].sum())
        loss_sum += torch.tensor([float(loss.detach()), tokens], dtype=torch.float64)
    return loss_sum, truncated


def _step_groups(trainer: Trainer, groups: list[Group], measure: bool) -> dict[Group, GroupStepStats]:
    """Step each active group's optimizer (a group with no steps in the schedule has none)."""
    stepped = [group for group in groups if group in trainer.groups]
    stats = {group: trainer.groups[group].step(trainer.scaler, measure=measure) for group in stepped}
    if trainer.scaler is not None:
        trainer.scaler.update()
    for optimizer in trainer.groups.values():
        optimizer.zero_grad()
    return stats


def _record(trainer: Trainer, task: Task, mean_loss: float, stats: dict[Group, GroupStepStats]
            ) -> dict[str, float]:
    """Optimizer and gate metrics, and the step's loss, gates and gradient norms in the history."""
    metrics: dict[str, float] = {}
    for group, stat in stats.items():
        metrics[f"lr/{group}"] = stat.lr
        metrics[f"grad_norm/{group}"] = stat.grad_norm
        trainer.history["grad_norm"].append([trainer.step, group, stat.grad_norm])
        if stat.param_norm is not None:
            metrics[f"param_norm/{group}"] = stat.param_norm
            metrics[f"update_ratio/{group}"] = stat.update_ratio or 0.0
    gates = trainer.model.gate_values()
    metrics.update({f"gate/{layer}": value for layer, value in gates.items()})
    trainer.history["loss"].append([trainer.step, task, mean_loss])
    trainer.history["gates"].append([trainer.step, gates])
    return metrics


def _warn_truncation(trainer: Trainer, task: Task, truncated: int) -> None:
    """Once per task: samples longer than the task's token limit lose their tail (EOS is kept)."""
    if truncated and task not in trainer.truncation_warned:
        trainer.truncation_warned.add(task)
        training = trainer.training
        LOG.warning(
            "%d of %d %s samples at step %d are longer than training.max_tokens_%s=%d and lose their "
            "tail (logged as data/truncated_fraction/%s)", truncated,
            training.grad_accum * training.batch_size, task, trainer.step, task,
            training.max_tokens(task), task,
        )
