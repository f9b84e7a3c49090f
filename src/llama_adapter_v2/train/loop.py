"""The training run: the step loop with evaluation, checkpoints and logging on their cadences.

Joint training on disjoint parameter groups (docs/METHOD.md §4), resumable bit for bit. The
parts: ``schedule`` (which task each step trains), ``trainer`` (the run's state), ``step`` (one
optimizer step), ``resume`` (checkpoint state out and back in). This module runs them: held-out
loss every ``eval_every_steps``, a checkpoint every ``checkpoint.every_steps`` (the best one by
held-out loss kept too), buffered MLflow logging from rank 0, and the final adapter, plots,
resolved config and parameter report.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.shards import INDEX_FILE, ShardIndex
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.infer.holdout import holdout_loss_sums, mean_loss
from llama_adapter_v2.model.checkpoint import base_identity, save_adapter
from llama_adapter_v2.model.trainable import GROUPS
from llama_adapter_v2.store import check_reachable, data_hash, git_commit, tracking_uri
from llama_adapter_v2.train import checkpoint as ckpt
from llama_adapter_v2.train.distributed import (
    DistContext,
    all_reduce_sum,
    init_distributed,
    reshard,
    shutdown,
)
from llama_adapter_v2.train.plots import draw_all, write_curves
from llama_adapter_v2.train.resume import checkpoint_to_resume, restore, training_state
from llama_adapter_v2.train.schedule import TASKS
from llama_adapter_v2.train.step import train_step
from llama_adapter_v2.train.tracking import Tracker, open_tracker
from llama_adapter_v2.train.trainer import Trainer

LOG = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str | None
    checkpoint_dir: Path
    adapter_dir: Path
    final_metrics: dict[str, float]
    losses: list[tuple[int, str, float]]
    seconds: float


def holdout_losses(trainer: Trainer) -> dict[str, float]:
    """Token-weighted mean loss over each task's whole held-out split (all ranks together)."""
    ctx = trainer.ctx
    trainer.model.set_trainable([])
    trainer.wrapped.eval()
    results: dict[str, float] = {}
    for task in TASKS:
        folder = DataPaths(trainer.cfg.data.work_dir).split(task, "holdout")
        if not (folder / INDEX_FILE).is_file() or ShardIndex.load(folder).count < ctx.world_size:
            continue
        sums = holdout_loss_sums(trainer.model, trainer.tokenizer, trainer.cfg, task, device=ctx.device,
                                 autocast=trainer.precision.autocast, rank=ctx.rank,
                                 world_size=ctx.world_size)
        results[task] = mean_loss(all_reduce_sum(sums, ctx))
        trainer.history["holdout"].append([trainer.step, task, results[task]])
    reshard(trainer.model)
    trainer.model.set_trainable(GROUPS)
    return results


def save_checkpoint(trainer: Trainer, holdout: dict[str, float] | None) -> Path | None:
    """Every rank calls it (FSDP gathers the shards); rank 0 writes and returns the folder."""
    tensors, state = training_state(trainer)
    adapter = trainer.model.adapter_state_dict()
    if not trainer.ctx.is_main:
        return None
    folder = ckpt.write_checkpoint(
        trainer.checkpoints, trainer.step, save_adapter=lambda out: save_adapter(trainer.model, out, adapter),
        tensors=tensors, state=state,
    )
    policy = trainer.training.checkpoint
    if policy.keep_best and holdout:
        score = sum(holdout.values()) / len(holdout)
        if trainer.best is None or score < trainer.best:
            trainer.best = score
            ckpt.mark_best(trainer.checkpoints, folder, score)
    ckpt.prune_checkpoints(trainer.checkpoints, policy.keep_last)
    return folder


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
    resumed = trainer.run_id is not None
    tracker = open_tracker(cfg, resume_run_id=trainer.run_id)
    trainer.run_id = tracker.run_id
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics(tracking_uri(cfg), interval_s=5.0)
    if not resumed:
        root = project_root()
        identity = base_identity(trainer.model.base.config)
        commit, data_version = git_commit(root), data_hash(root)
        tracker.set_tags({
            # MLflow's own source fields (its UI shows them), then the project's
            "mlflow.source.git.commit": commit.removesuffix("-dirty"), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "lav2 train", "git_commit": commit, "data_dvc_md5": data_version,
            "base_model": f"{identity['architecture']} {identity['config_sha256'][:12]}",
            "base_config_sha256": identity["config_sha256"], "base_path": str(cfg.model.base.path),
            "world_size": str(ctx.world_size),
        })
        tracker.log_datasets(shard_datasets(cfg, data_version))
        data_docs = DataPaths(cfg.data.work_dir).data_docs
        if (data_docs / "index.html").is_file():  # the validation of the data it trains on, as GX shows it
            tracker.log_artifact(data_docs, "data_docs")
    return tracker


def shard_datasets(cfg: Config, digest: str) -> list[dict[str, Any]]:
    """Each task's train and held-out shards as run inputs, sized from their shard indexes."""
    contexts = {"train": "training", "holdout": "evaluation"}
    shards = DataPaths(cfg.data.work_dir).shards
    datasets = []
    for task in ("caption", "instruction"):
        for split, context in contexts.items():
            folder = shards / task / split
            if (folder / INDEX_FILE).is_file():
                datasets.append({
                    "name": f"{cfg.name}-{task}-{split}", "digest": digest[:36], "context": context,
                    "source": folder.resolve().as_uri(), "samples": ShardIndex.load(folder).count,
                })
    return datasets


def _progress(enabled: bool) -> Progress:
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
            metrics = train_step(trainer, measure=(trainer.step + 1) % training.log_every_steps == 0)
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
                holdout = holdout_losses(trainer)
                tracker.log_step(step, {f"holdout/{task}": value for task, value in holdout.items()})
            if step % training.log_every_steps == 0:
                tracker.flush()
            if checkpoint_due:
                save_checkpoint(trainer, holdout)
            loss = next(v for k, v in metrics.items() if k.startswith("loss/"))
            info = f"loss {loss:.3f}  {metrics['tokens_per_s']:,.0f} tok/s"
            progress.update(bar, completed=step, info=info)


def clipped_fractions(grad_norms: list[Any], grad_clip: float | None) -> dict[str, float]:
    """Per group, the share of its steps whose gradient norm was above ``grad_clip`` (so was clipped):
    near 1, every step is clipped and the learning rate is not what it says."""
    if grad_clip is None:
        return {}
    norms: dict[str, list[float]] = {}
    for _, group, norm in grad_norms:
        norms.setdefault(group, []).append(norm)
    return {f"clipped_fraction/{group}": sum(n > grad_clip for n in values) / len(values)
            for group, values in sorted(norms.items())}


def write_train_metrics(final: dict[str, float], steps: int, path: Path) -> None:
    """The train stage's DVC metrics, flat and named like the evaluation's (``<task>_holdout_loss``)."""
    metrics: dict[str, float] = {"steps": steps}
    for key, value in final.items():
        kind, _, name = key.partition("/")
        if kind in ("holdout", "holdout_initial") and name:
            metrics[f"{name}_holdout_loss" + ("_step0" if kind == "holdout_initial" else "")] = value
        elif kind == "clipped_fraction":
            metrics[f"{name}_clipped_fraction"] = value
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n", encoding="utf-8")


def finish_run(trainer: Trainer, tracker: Tracker, seconds: float) -> TrainResult:
    """Final adapter, plots, resolved config and parameter report; uploaded as run artifacts."""
    out = trainer.training.output_dir
    adapter_dir = out / "adapter"
    final = {f"holdout/{t}": v for s, t, v in trainer.history["holdout"] if s == trainer.step}
    final.update({f"holdout_initial/{t}": v for s, t, v in trainer.history["holdout"] if s == 0})
    final["tracking/overhead_fraction"] = tracker.seconds_spent / max(trainer.step_seconds, 1e-9)
    # wall time per step on the training thread, tracking calls included (0 steps: resumed at the end)
    busy = trainer.step_seconds + tracker.seconds_spent
    final["train/seconds_per_step"] = busy / max(trainer.steps_run, 1)
    final |= clipped_fractions(trainer.history["grad_norm"], trainer.training.grad_clip)
    adapter = trainer.model.adapter_state_dict()  # every rank: under FSDP gathering is a collective
    if trainer.ctx.is_main:
        save_adapter(trainer.model, adapter_dir, adapter)
        (out / "config.yaml").write_text(yaml.safe_dump(trainer.cfg.model_dump(mode="json"), sort_keys=False))
        (out / "parameters.json").write_text(json.dumps(parameter_report(trainer.model), indent=2) + "\n")
        plots = draw_all(trainer.history, out / "plots")
        write_curves(trainer.history, out / "plots")
        write_train_metrics(final, trainer.step, out / "train-metrics.json")
        tracker.log_step(trainer.step, {key: value for key, value in final.items()
                                        if key.startswith(("tracking/overhead", "clipped_fraction/"))})
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
    """Train the adapter as ``cfg`` says; under ``torchrun`` each process calls this.

    The trainer (its DDP or FSDP wrapper holds the process group from C++) is gone before the
    process group is destroyed, also when training raises: see ``distributed.shutdown``.
    """
    started = time.perf_counter()
    ctx = init_distributed(cfg.training)
    try:
        return _train(cfg, ctx, resume, started)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the traceback would keep the trainer alive
        raise
    finally:
        shutdown(ctx)


def _train(cfg: Config, ctx: DistContext, resume: bool, started: float) -> TrainResult:
    if cfg.tracking.enabled and ctx.is_main:
        check_reachable(tracking_uri(cfg))  # before any work: an unreachable server fails now
    trainer = Trainer(cfg, ctx)
    loaded = checkpoint_to_resume(trainer.checkpoints, resume)
    if loaded is not None:
        restore(trainer, loaded)
        LOG.info("resuming from %s (step %d)", loaded.folder, loaded.step)
    tracker = open_tracking(cfg, ctx, trainer)
    status = "FAILED"
    try:
        if trainer.step == 0:
            initial = holdout_losses(trainer)
            tracker.log_step(0, {f"holdout/{task}": value for task, value in initial.items()})
        run_steps(trainer, tracker)
        result = finish_run(trainer, tracker, time.perf_counter() - started)
        status = "FINISHED"
        return result
    finally:
        tracker.close(status)
