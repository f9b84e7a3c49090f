"""Resume bit for bit: everything that decides the next step goes into a checkpoint and comes back.

Adapter weights, both optimizers, their schedules' step counters, the loss scaler, RNG states,
each task's data position and the history: a resumed run continues with exactly the numbers
the uninterrupted run would have produced (same world size; see ``check_resumable`` for another).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llama_adapter_v2.model.checkpoint import load_adapter
from llama_adapter_v2.train import checkpoint as ckpt
from llama_adapter_v2.train.optim import effective_batch
from llama_adapter_v2.train.state import optimizer_state, restore_optimizer, restore_rng, rng_state
from llama_adapter_v2.train.trainer import Trainer

LOG = logging.getLogger(__name__)


def training_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a resume needs, as whole tensors (under FSDP a collective: all ranks call it)."""
    tensors, rng_plain = rng_state()
    groups: dict[str, Any] = {}
    for name, group in trainer.groups.items():
        group_tensors, plain = optimizer_state(name, group.optimizer)
        tensors.update(group_tensors)
        groups[name] = {"steps_taken": group.steps_taken, "optimizer": plain}
    state = {
        "step": trainer.step, "run_id": trainer.run_id, "world_size": trainer.ctx.world_size,
        "global_batch": effective_batch(trainer.training, trainer.ctx.world_size),
        "config_name": trainer.cfg.name, "groups": groups, "rng": rng_plain,
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "data": {task: stream.position() for task, stream in trainer.streams.items()},
        "history": trainer.history, "best_holdout": trainer.best,
    }
    return tensors, state


def restore(trainer: Trainer, loaded: ckpt.LoadedCheckpoint) -> None:
    """Put a checkpoint's state back into a freshly built trainer of the same config."""
    state = loaded.state
    check_resumable(loaded, trainer.ctx.world_size, effective_batch(trainer.training, trainer.ctx.world_size))
    load_adapter(trainer.model, loaded.adapter_dir)
    for name, group in trainer.groups.items():
        saved = state["groups"][name]
        restore_optimizer(name, group.optimizer, loaded.tensors, saved["optimizer"])
        group.steps_taken = saved["steps_taken"]
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    for task, position in state["data"].items():
        trainer.streams[task].epoch, trainer.streams[task].consumed = position["epoch"], position["batches"]
    restore_rng(loaded.tensors, state["rng"])
    trainer.step, trainer.history = state["step"], state["history"]
    trainer.best, trainer.run_id = state["best_holdout"], state["run_id"]


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
