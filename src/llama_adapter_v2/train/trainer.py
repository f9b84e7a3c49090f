"""One training run's state on one rank: the model (wrapped for DDP/FSDP), one AdamW per group,
the task schedule, each task's data stream, and the bookkeeping that checkpoints carry.

What a step does is ``step``'s; checkpoints, evaluation and logging are the run's (``loop``);
saving and restoring all of this state is ``resume``'s.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.model.build import build_model, load_tokenizer
from llama_adapter_v2.model.trainable import GROUPS, Group
from llama_adapter_v2.train.distributed import DistContext, wrap_for_training
from llama_adapter_v2.train.optim import (
    GroupOptimizer,
    Precision,
    build_group_optimizer,
    keep_trainable_in_fp32,
)
from llama_adapter_v2.train.schedule import TASKS, steps_per_group, task_schedule
from llama_adapter_v2.train.streams import TaskStream, training_stream


class LossOf(nn.Module):
    """Model -> scalar loss, so DDP/FSDP see a plain tensor output they can trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                images: torch.Tensor | None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images,
                            image_mask=image_mask)
        return output.loss


def empty_history() -> dict[str, list[Any]]:
    return {"loss": [], "holdout": [], "gates": [], "grad_norm": []}


class Trainer:
    """Everything one rank's training holds; built from the config, seeded by ``training.seed``."""

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx, self.training = cfg, ctx, cfg.training
        torch.manual_seed(self.training.seed)
        random.seed(self.training.seed)
        self.precision = Precision(ctx.device.type, self.training.precision)
        self.model = build_model(cfg, device=ctx.device, dtype=self.precision.frozen_dtype)
        keep_trainable_in_fp32(self.model.adapter_parameters())
        if self.training.activation_checkpointing:  # before wrapping: FSDP2's hooks then stay outside it
            self.model.enable_activation_checkpointing()
        self.model.set_trainable(GROUPS)
        # before the optimizers: FSDP replaces every parameter by its DTensor shard
        self.wrapped = wrap_for_training(LossOf(self.model), ctx, self.training)
        self.tokenizer = load_tokenizer(cfg)
        self.schedule = task_schedule(self.training)
        self.groups = self._group_optimizers()
        self.scaler = self.precision.make_scaler()
        self.streams: dict[str, TaskStream] = {
            task: training_stream(cfg, task, self.tokenizer, self.model.image_transform, ctx)
            for task in TASKS if task in self.schedule
        }
        self.step = 0
        self.history = empty_history()
        self.best: float | None = None
        self.run_id: str | None = None
        self.checkpoints = self.training.output_dir / "checkpoints"
        self.step_seconds = 0.0
        self.steps_run = 0
        self.tokens_seen = 0
        self.truncation_warned: set[str] = set()

    def _group_optimizers(self) -> dict[Group, GroupOptimizer]:
        """One AdamW per group that takes steps, over the parameters its declarations put in it."""
        totals = steps_per_group(self.schedule, self.training)
        declared = self.model.adapter_parameters()
        return {
            group: build_group_optimizer(
                group, [p for p in declared if p.trainable.group == group], getattr(self.training, group),
                self.training, total_steps=totals[group], world_size=self.ctx.world_size,
            )
            for group in GROUPS if totals[group] > 0
        }
