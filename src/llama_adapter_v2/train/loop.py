"""Joint training on disjoint parameter groups (METHOD.md section 4), resumable bit for bit.

Each optimizer step belongs to one task, drawn from a seeded schedule: a caption step runs
caption batches and updates only the visual group, an instruction step only the language group
(``training.trainable: all`` updates every adapter parameter on every batch, as an ablation;
``schedule: two_phase`` runs all caption steps first, as the released code does). Everything
that decides the next step (adapter weights, both optimizers, schedules, RNG states, each
task's data position, the loss history) is in the checkpoint, so a resumed run continues with
exactly the numbers the uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llama_adapter_v2.config.schema import Config, TrainingConfig
from llama_adapter_v2.train import checkpoint as ckpt
from llama_adapter_v2.train.distributed import (
    DistContext,
    all_reduce_sum,
    gradient_sync,
    init_distributed,
    reshard,
    shutdown,
    wrap_for_training,
)
from llama_adapter_v2.train.optim import (
    GroupOptimizer,
    Precision,
    build_group_optimizer,
    effective_batch,
    keep_trainable_in_fp32,
)
from llama_adapter_v2.train.state import optimizer_state, restore_optimizer, restore_rng, rng_state
from llama_adapter_v2.train.tracking import Tracker

LOG = logging.getLogger(__name__)
Task = Literal["caption", "instruction"]
TASKS: tuple[Task, ...] = ("caption", "instruction")
GROUP_OF_TASK = {"caption": "visual", "instruction": "language"}


# --------------------------------------------------------------------------- schedule


def task_schedule(training: TrainingConfig) -> list[Task]:
    """The task of every step: caption_ratio of them captions, seeded-shuffled (joint) or first."""
    n_caption = round(training.steps * training.caption_ratio)
    tasks: list[Task] = ["caption"] * n_caption + ["instruction"] * (training.steps - n_caption)
    if training.schedule == "joint":
        random.Random(training.seed).shuffle(tasks)
    return tasks


def active_groups(task: Task, training: TrainingConfig) -> list[str]:
    return ["visual", "language"] if training.trainable == "all" else [GROUP_OF_TASK[task]]


def steps_per_group(schedule: list[Task], training: TrainingConfig) -> dict[str, int]:
    """How many optimizer steps each group will take: the length of its own lr schedule."""
    counts = {"visual": 0, "language": 0}
    for task in schedule:
        for group in active_groups(task, training):
            counts[group] += 1
    return counts


# --------------------------------------------------------------------------- data


def shard_dir(cfg: Config, task: Task, split: str) -> Path:
    return cfg.data.work_dir / "shards" / task / split


@dataclass
class TaskStream:
    """Endless batches of one task, with the (epoch, batches consumed) position that resumes it."""

    task: Task
    folder: Path
    loader_args: dict[str, Any]
    epoch: int = 0
    consumed: int = 0
    _batches: Iterator[dict[str, Any]] | None = field(default=None, repr=False)

    def _open(self) -> Iterator[dict[str, Any]]:
        from llama_adapter_v2.data.shards import make_loader

        loader = make_loader(self.folder, epoch=self.epoch, skip_batches=self.consumed, **self.loader_args)
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._open()
        for _ in range(2):
            try:
                batch = next(self._batches)
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                self._batches = self._open()
                continue
            self.consumed += 1
            return batch
        raise RuntimeError(f"{self.folder}: an epoch of {self.task} data yields no batch")

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.consumed}


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


# --------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    run_id: str | None
    checkpoint_dir: Path
    adapter_dir: Path
    final_metrics: dict[str, float]
    losses: list[tuple[int, str, float]]
    seconds: float


def empty_history() -> dict[str, list[Any]]:
    return {"loss": [], "holdout": [], "gates": [], "grad_norm": []}


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One training run on one rank; see the module docstring for what each step does."""

    def __init__(self, cfg: Config, ctx: DistContext):
        from llama_adapter_v2.model.build import build_model, load_tokenizer

        self.cfg, self.ctx, self.training = cfg, ctx, cfg.training
        torch.manual_seed(self.training.seed)
        random.seed(self.training.seed)
        self.precision = Precision(ctx.device.type, self.training.precision)
        self.model = build_model(cfg, device=ctx.device, dtype=self.precision.frozen_dtype)
        keep_trainable_in_fp32(self.model.parameter_groups())
        self.model.set_trainable(["visual", "language"])
        # before the optimizers: FSDP replaces every parameter by its DTensor shard
        self.wrapped = wrap_for_training(LossOf(self.model), ctx, self.training)
        self.tokenizer = load_tokenizer(cfg)
        self.schedule = task_schedule(self.training)
        totals = steps_per_group(self.schedule, self.training)
        groups = self.model.parameter_groups()
        self.groups: dict[str, GroupOptimizer] = {
            name: build_group_optimizer(
                name, groups[name], getattr(self.training, name), self.training,
                total_steps=totals[name], world_size=ctx.world_size,
            )
            for name in ("visual", "language") if totals[name] > 0
        }
        self.scaler = self.precision.make_scaler()
        self.streams = {task: self._stream(task, "train") for task in TASKS if task in self.schedule}
        self.step = 0
        self.history = empty_history()
        self.best: float | None = None
        self.run_id: str | None = None
        self.checkpoints = self.training.output_dir / "checkpoints"
        self.step_seconds = 0.0
        self.steps_run = 0
        self.tokens_seen = 0
        self.truncation_warned: set[str] = set()

    def _loader_args(self, task: Task) -> dict[str, Any]:
        training = self.training
        max_tokens = training.max_tokens_caption if task == "caption" else training.max_tokens_instruction
        return {
            "tokenizer": self.tokenizer, "batch_size": self.training.batch_size, "max_tokens": max_tokens,
            "image_transform": self.model.image_transform, "seed": self.training.seed,
            "rank": self.ctx.rank, "world_size": self.ctx.world_size,
            "num_workers": self.cfg.data.shards.loader_workers,
            "text_only": task == "instruction" and not training.multimodal_instructions,
        }

    def _stream(self, task: Task, split: str) -> TaskStream:
        return TaskStream(task, shard_dir(self.cfg, task, split), self._loader_args(task))

    # ------------------------------------------------------------------ one step

    def train_step(self, *, measure: bool) -> dict[str, float]:
        """Run ``grad_accum`` batches of this step's task and step the groups it trains."""
        task = self.schedule[self.step]
        names = active_groups(task, self.training)
        self.model.set_trainable(names)
        self.wrapped.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of micro losses, tokens]
        truncated = 0
        for micro in range(self.training.grad_accum):
            batch = to_device(self.streams[task].next_batch(), self.ctx.device)
            truncated += batch.get("truncated", 0)
            last = micro == self.training.grad_accum - 1
            with gradient_sync(self.wrapped, enabled=last):  # the backward too: FSDP2 reads it there
                with self.precision.autocast():
                    loss = self.wrapped(
                        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                        batch.get("has_image"),
                    )
                scaled = loss / self.training.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            tokens = float(batch["attention_mask"].sum())
            loss_sum += torch.tensor([float(loss.detach()), tokens], dtype=torch.float64)
        stepped = [name for name in names if name in self.groups]
        stats = {name: self.groups[name].step(self.scaler, measure=measure) for name in stepped}
        if self.scaler is not None:
            self.scaler.update()
        for group in self.groups.values():
            group.zero_grad()
        totals = all_reduce_sum(loss_sum, self.ctx)
        mean_loss = float(totals[0]) / (self.training.grad_accum * self.ctx.world_size)
        self.tokens_seen += int(totals[1])
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{task} loss became {mean_loss} at step {self.step + 1}")
        self.step += 1
        samples = self.training.grad_accum * self.training.batch_size
        metrics = {f"loss/{task}": mean_loss, "tokens": float(totals[1]),
                   f"data/truncated_fraction/{task}": truncated / samples}
        self._warn_truncation(task, truncated)
        for name, stat in stats.items():
            metrics[f"lr/{name}"] = stat.lr
            metrics[f"grad_norm/{name}"] = stat.grad_norm
            self.history["grad_norm"].append([self.step, name, stat.grad_norm])
            if stat.param_norm is not None:
                metrics[f"param_norm/{name}"] = stat.param_norm
                metrics[f"update_ratio/{name}"] = stat.update_ratio or 0.0
        gates = self.model.gate_values()
        metrics.update({f"gate/{layer}": value for layer, value in gates.items()})
        self.history["loss"].append([self.step, task, mean_loss])
        self.history["gates"].append([self.step, gates])
        return metrics

    def _warn_truncation(self, task: Task, truncated: int) -> None:
        """Once per task: samples longer than the task's token limit lose their tail (EOS is kept)."""
        if truncated and task not in self.truncation_warned:
            self.truncation_warned.add(task)
            LOG.warning(
                "%d of %d %s samples at step %d are longer than training.max_tokens_%s=%d and lose their "
                "tail (logged as data/truncated_fraction/%s)", truncated,
                self.training.grad_accum * self.training.batch_size, task, self.step + 1, task,
                self._loader_args(task)["max_tokens"], task,
            )

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def holdout_losses(self) -> dict[str, float]:
        """Token-weighted mean loss over each task's whole held-out split (all ranks together)."""
        from llama_adapter_v2.data.shards import ShardIndex, make_loader

        self.model.set_trainable([])
        self.wrapped.eval()
        results: dict[str, float] = {}
        for task in TASKS:
            folder = shard_dir(self.cfg, task, "holdout")
            if not (folder / "index.json").is_file() or ShardIndex.load(folder).count < self.ctx.world_size:
                continue
            total = torch.zeros(2, dtype=torch.float64)
            every_sample = {**self._loader_args(task), "text_only": False}  # the same yardstick for all runs
            for raw in make_loader(folder, epoch=0, **every_sample):
                batch = to_device(raw, self.ctx.device)
                with self.precision.autocast():
                    loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=batch["labels"], images=batch["images"],
                                      image_mask=batch.get("has_image")).loss
                tokens = supervised_tokens(batch["labels"])
                total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
            total = all_reduce_sum(total, self.ctx)
            results[task] = float(total[0] / total[1].clamp(min=1))
            self.history["holdout"].append([self.step, task, results[task]])
        reshard(self.model)
        self.model.set_trainable(["visual", "language"])
        return results

    # ------------------------------------------------------------------ checkpoints

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resume needs, as whole tensors (under FSDP a collective: all ranks call it)."""
        tensors, rng_plain = rng_state()
        groups: dict[str, Any] = {}
        for name, group in self.groups.items():
            group_tensors, plain = optimizer_state(name, group.optimizer)
            tensors.update(group_tensors)
            groups[name] = {"steps_taken": group.steps_taken, "optimizer": plain}
        state = {
            "step": self.step, "run_id": self.run_id, "world_size": self.ctx.world_size,
            "global_batch": effective_batch(self.training, self.ctx.world_size),
            "config_name": self.cfg.name, "groups": groups, "rng": rng_plain,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": {task: stream.position() for task, stream in self.streams.items()},
            "history": self.history, "best_holdout": self.best,
        }
        return tensors, state

    def save_checkpoint(self, holdout: dict[str, float] | None) -> Path | None:
        """Every rank calls it (FSDP gathers the shards); rank 0 writes and returns the folder."""
        from llama_adapter_v2.model.checkpoint import save_adapter

        tensors, state = self.training_state()
        adapter = self.model.adapter_state_dict()
        if not self.ctx.is_main:
            return None
        folder = ckpt.write_checkpoint(
            self.checkpoints, self.step, save_adapter=lambda out: save_adapter(self.model, out, adapter),
            tensors=tensors, state=state,
        )
        policy = self.training.checkpoint
        if policy.keep_best and holdout:
            score = sum(holdout.values()) / len(holdout)
            if self.best is None or score < self.best:
                self.best = score
                ckpt.mark_best(self.checkpoints, folder, score)
        ckpt.prune_checkpoints(self.checkpoints, policy.keep_last)
        return folder

    def restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        from llama_adapter_v2.model.checkpoint import load_adapter

        state = loaded.state
        check_resumable(loaded, self.ctx.world_size, effective_batch(self.training, self.ctx.world_size))
        load_adapter(self.model, loaded.adapter_dir)
        for name, group in self.groups.items():
            saved = state["groups"][name]
            restore_optimizer(name, group.optimizer, loaded.tensors, saved["optimizer"])
            group.steps_taken = saved["steps_taken"]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        for task, position in state["data"].items():
            self.streams[task].epoch, self.streams[task].consumed = position["epoch"], position["batches"]
        restore_rng(loaded.tensors, state["rng"])
        self.step, self.history = state["step"], state["history"]
        self.best, self.run_id = state["best_holdout"], state["run_id"]


def check_resumable(loaded: ckpt.LoadedCheckpoint, world_size: int, global_batch: int) -> None:
    """Another world size may resume a checkpoint only at the same global batch.

    Checkpoints hold whole tensors, so any world size can load them. Each task's data position
    (epoch, batches taken) then stands for the same number of samples of that epoch, but not the
    same samples: rank r reads the r-th slice of the epoch's permutation, so the rest of the epoch
    is drawn from another split of it. The run continues the same way statistically, not exactly.
    """
    state = loaded.state
    if state["world_size"] == world_size:
        return
    if state.get("global_batch") != global_batch:
        raise RuntimeError(
            f"{loaded.folder}: written by {state['world_size']} processes at a global batch of "
            f"{state.get('global_batch', 'unrecorded')}, resumed with {world_size} at {global_batch}; "
            f"set training.batch_size so that the global batch matches, or resume with the same world size"
        )
    LOG.warning(
        "%s: written by %d processes, resumed with %d at the same global batch %d; the rest of each "
        "epoch is drawn from another split of its permutation", loaded.folder, state["world_size"],
        world_size, global_batch,
    )


# --------------------------------------------------------------------------- the run


def checkpoint_to_resume(root: Path, resume: bool) -> ckpt.LoadedCheckpoint | None:
    """The newest complete checkpoint when resuming; a fresh run refuses to mix with an old one."""
    if not resume:
        if ckpt.step_checkpoints(root):
            raise FileExistsError(
                f"{root} already holds checkpoints of an earlier run: pass --resume to continue it, "
                f"or set training.output_dir to another folder"
            )
        return None
    loaded = ckpt.latest_complete_checkpoint(root)
    if loaded is None:
        LOG.warning("--resume: no complete checkpoint in %s; starting from step 0", root)
    return loaded


def parameter_report(model: Any) -> dict[str, Any]:
    """Trainable counts per group and the frozen remainder (logged as a run artifact)."""
    groups = model.parameter_groups()
    trainable = {name: sum(p.numel() for _, p in members) for name, members in groups.items()}
    total = sum(p.numel() for p in model.parameters())
    return {
        "groups": {name: {"parameters": n, "tensors": len(groups[name])} for name, n in trainable.items()},
        "trainable": sum(trainable.values()),
        "frozen": total - sum(trainable.values()),
        "trainable_percent": 100.0 * sum(trainable.values()) / max(total, 1),
    }


def open_tracking(cfg: Config, ctx: DistContext, trainer: Trainer) -> Tracker:
    """Rank 0 logs to MLflow (reopening the checkpoint's run on resume); other ranks log nothing."""
    if not (cfg.tracking.enabled and ctx.is_main):
        return Tracker()
    from llama_adapter_v2.config.locations import tracking_uri
    from llama_adapter_v2.environment import project_root
    from llama_adapter_v2.model.checkpoint import base_identity
    from llama_adapter_v2.train.tracking import data_dvc_hash, git_commit, open_tracker

    resumed = trainer.run_id is not None
    tracker = open_tracker(cfg, resume_run_id=trainer.run_id)
    trainer.run_id = tracker.run_id
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics(tracking_uri(cfg), interval_s=5.0)
    if not resumed:
        root = project_root()
        identity = base_identity(trainer.model.base.config)
        tracker.set_tags({
            "git_commit": git_commit(root), "data_dvc_md5": data_dvc_hash(root),
            "base_model": f"{identity['architecture']} {identity['config_sha256'][:12]}",
            "base_config_sha256": identity["config_sha256"], "base_path": str(cfg.model.base.path),
            "world_size": str(ctx.world_size),
        })
    return tracker


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled,
    )


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def run_steps(trainer: Trainer, tracker: Tracker) -> None:
    """The step loop: train, log (batched), evaluate and checkpoint on their cadences."""
    training = trainer.training
    with _progress(trainer.ctx.is_main) as progress:
        bar = progress.add_task("train", total=training.steps, completed=trainer.step, info="")
        while trainer.step < training.steps:
            started = time.perf_counter()
            metrics = trainer.train_step(measure=(trainer.step + 1) % training.log_every_steps == 0)
            seconds = time.perf_counter() - started
            trainer.step_seconds += seconds
            trainer.steps_run += 1
            metrics["tokens_per_s"] = metrics.pop("tokens") / seconds
            step = trainer.step
            tracker.log_step(step, metrics)
            holdout = None
            checkpoint_due = _due(step, training.checkpoint.every_steps, training.steps)
            if _due(step, training.eval_every_steps, training.steps) or (
                checkpoint_due and training.checkpoint.keep_best
            ):
                holdout = trainer.holdout_losses()
                tracker.log_step(step, {f"holdout/{task}": value for task, value in holdout.items()})
            if step % training.log_every_steps == 0:
                tracker.flush()
            if checkpoint_due:
                trainer.save_checkpoint(holdout)
            loss = next(v for k, v in metrics.items() if k.startswith("loss/"))
            info = f"loss {loss:.3f}  {metrics['tokens_per_s']:,.0f} tok/s"
            progress.update(bar, completed=step, info=info)


def finish_run(trainer: Trainer, tracker: Tracker, seconds: float) -> TrainResult:
    """Final adapter, plots, resolved config and parameter report; uploaded as run artifacts."""
    import json

    import yaml

    from llama_adapter_v2.model.checkpoint import save_adapter
    from llama_adapter_v2.train.plots import draw_all

    out = trainer.training.output_dir
    adapter_dir = out / "adapter"
    final = {f"holdout/{t}": v for s, t, v in trainer.history["holdout"] if s == trainer.step}
    final.update({f"holdout_initial/{t}": v for s, t, v in trainer.history["holdout"] if s == 0})
    final["tracking/overhead_fraction"] = tracker.seconds_spent / max(trainer.step_seconds, 1e-9)
    # wall time per step on the training thread, tracking calls included (0 steps: resumed at the end)
    busy = trainer.step_seconds + tracker.seconds_spent
    final["train/seconds_per_step"] = busy / max(trainer.steps_run, 1)
    adapter = trainer.model.adapter_state_dict()  # every rank: under FSDP gathering is a collective
    if trainer.ctx.is_main:
        save_adapter(trainer.model, adapter_dir, adapter)
        (out / "config.yaml").write_text(yaml.safe_dump(trainer.cfg.model_dump(mode="json"), sort_keys=False))
        (out / "parameters.json").write_text(json.dumps(parameter_report(trainer.model), indent=2) + "\n")
        plots = draw_all(trainer.history, out / "plots")
        tracker.log_step(trainer.step, {"tracking/overhead_fraction": final["tracking/overhead_fraction"]})
        for path in (out / "config.yaml", out / "parameters.json"):
            tracker.log_artifact(path)
        for path in plots:
            tracker.log_artifact(path, "plots")
        tracker.log_artifact(adapter_dir, "adapter")
        if (trainer.checkpoints / ckpt.BEST).is_dir():
            tracker.log_artifact(trainer.checkpoints / ckpt.BEST, "checkpoints/best")
    losses = [(int(s), str(t), float(v)) for s, t, v in trainer.history["loss"]]
    return TrainResult(trainer.run_id, trainer.checkpoints, adapter_dir, final, losses, seconds)


def train(cfg: Config, resume: bool = False) -> TrainResult:
    """Train the adapter as ``cfg`` says; under ``torchrun`` each process calls this."""
    from llama_adapter_v2.config.locations import tracking_uri
    from llama_adapter_v2.train.tracking import check_reachable

    started = time.perf_counter()
    ctx = init_distributed(cfg.training)
    try:
        if cfg.tracking.enabled and ctx.is_main:
            check_reachable(tracking_uri(cfg))  # before any work: an unreachable server fails now
        trainer = Trainer(cfg, ctx)
        loaded = checkpoint_to_resume(trainer.checkpoints, resume)
        if loaded is not None:
            trainer.restore(loaded)
            LOG.info("resuming from %s (step %d)", loaded.folder, loaded.step)
        tracker = open_tracking(cfg, ctx, trainer)
        status = "FAILED"
        try:
            if trainer.step == 0:
                initial = trainer.holdout_losses()
                tracker.log_step(0, {f"holdout/{task}": value for task, value in initial.items()})
            run_steps(trainer, tracker)
            result = finish_run(trainer, tracker, time.perf_counter() - started)
            status = "FINISHED"
            return result
        finally:
            tracker.close(status)
    finally:
        shutdown(ctx)
