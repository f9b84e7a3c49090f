"""Joint training: task schedule, disjoint groups bit for bit, and a pinned loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_project import ONE_PROCESS_HOLDOUT, PINNED_LOSSES, TINY_STEPS, tiny_config

from llama_adapter_v2.config import load_config
from llama_adapter_v2.config.schema import TrainingConfig
from llama_adapter_v2.train.distributed import DistContext, wrap_for_training
from llama_adapter_v2.train.loop import holdout_losses, train
from llama_adapter_v2.train.schedule import steps_per_group, task_schedule
from llama_adapter_v2.train.step import train_step
from llama_adapter_v2.train.streams import training_stream
from llama_adapter_v2.train.trainer import Trainer

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PINNED_TASKS = ["caption", "instruction", "instruction", "caption", "instruction", "caption",
                "caption", "instruction", "caption", "caption", "instruction", "instruction"]


def test_joint_schedule_mixes_tasks_at_the_ratio_and_two_phase_runs_captions_first() -> None:
    joint = task_schedule(TrainingConfig(steps=40, caption_ratio=0.25, seed=1))
    assert joint.count("caption") == 10 and joint != sorted(joint)
    assert joint == task_schedule(TrainingConfig(steps=40, caption_ratio=0.25, seed=1))
    assert joint != task_schedule(TrainingConfig(steps=40, caption_ratio=0.25, seed=2))
    phases = task_schedule(TrainingConfig(steps=10, caption_ratio=0.3, schedule="two_phase"))
    assert phases == ["caption"] * 3 + ["instruction"] * 7
    assert steps_per_group(phases, TrainingConfig()) == {"visual": 3, "language": 7}
    assert steps_per_group(phases, TrainingConfig(trainable="all")) == {"visual": 10, "language": 10}


def test_only_instruction_streams_drop_image_samples_when_multimodal_instructions_is_off(
    tiny_project: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_project, tmp_path / "run", "training.multimodal_instructions=false")

    def text_only(task: str, config=cfg) -> bool:
        return training_stream(config, task, None, None, SINGLE).loader_args["text_only"]

    assert text_only("instruction") and not text_only("caption")
    default = tiny_config(tiny_project, tmp_path / "run")
    assert not text_only("instruction", default) and not text_only("caption", default)


def _snapshot(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {group: {name: p.detach().clone() for name, p in members}
            for group, members in trainer.model.parameter_groups().items()}


def _changed(before: dict[str, torch.Tensor], trainer: Trainer, group: str) -> list[str]:
    now = dict(trainer.model.parameter_groups()[group])
    return [name for name, value in before.items() if not torch.equal(value, now[name])]


@pytest.mark.parametrize("task, trained, untouched", [("caption", "visual", "language"),
                                                      ("instruction", "language", "visual")])
def test_a_step_changes_only_its_own_group_bit_for_bit(
    tiny_project: Path, tmp_path: Path, task: str, trained: str, untouched: str
) -> None:
    trainer = Trainer(tiny_config(tiny_project, tmp_path), SINGLE)
    trainer.schedule = [task, "caption" if task == "instruction" else "instruction"]
    initial = _snapshot(trainer)
    for _ in range(2):  # the zero gates open on step 1, the rest of the group moves on step 2
        trainer.schedule[trainer.step] = task
        before = _snapshot(trainer)
        metrics = train_step(trainer, measure=True)
        assert _changed(before[untouched], trainer, untouched) == []
    assert len(_changed(initial[trained], trainer, trained)) == len(initial[trained])
    assert f"loss/{task}" in metrics and f"grad_norm/{trained}" in metrics
    assert f"grad_norm/{untouched}" not in metrics
    assert trainer.groups[untouched].steps_taken == 0 and trainer.groups[trained].steps_taken == 2


def test_trainable_all_updates_both_groups_on_a_caption_batch(tiny_project: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tiny_project, tmp_path, "training.trainable=all"), SINGLE)
    trainer.schedule[0] = "caption"
    before = _snapshot(trainer)
    train_step(trainer, measure=False)
    assert _changed(before["visual"], trainer, "visual")
    assert _changed(before["language"], trainer, "language")


def test_pinned_loss_curve_of_the_tiny_config(tiny_project: Path, tmp_path: Path) -> None:
    result = train(tiny_config(tiny_project, tmp_path / "run"))
    assert [task for _, task, _ in result.losses] == PINNED_TASKS
    assert [step for step, _, _ in result.losses] == list(range(1, TINY_STEPS + 1))
    assert [loss for _, _, loss in result.losses] == pytest.approx(PINNED_LOSSES, abs=2e-3)
    metrics = result.final_metrics
    for task, (initial, final) in ONE_PROCESS_HOLDOUT.items():
        assert metrics[f"holdout_initial/{task}"] == pytest.approx(initial, abs=2e-3)
        assert metrics[f"holdout/{task}"] == pytest.approx(final, abs=2e-3)
    assert metrics["holdout/caption"] < metrics["holdout_initial/caption"] - 0.3
    # outputs: final adapter, checkpoints kept (last 2 + best), plots, config, parameter report
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == ["best", "step-0000008", "step-0000012"]
    assert (result.adapter_dir / "adapter.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == [
        "gate_magnitude.png", "grad_norm_language.csv", "grad_norm_per_group.png", "grad_norm_visual.csv",
        "loss_caption_holdout.csv", "loss_caption_train.csv", "loss_instruction_holdout.csv",
        "loss_instruction_train.csv", "loss_per_task.png"]
    report = json.loads((tmp_path / "run" / "parameters.json").read_text())
    groups = report["groups"]
    assert report["trainable"] == groups["visual"]["parameters"] + groups["language"]["parameters"] > 0
    resolved = load_config(tmp_path / "run" / "config.yaml")
    assert resolved.training.steps == TINY_STEPS


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tiny_project: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tiny_project, tmp_path))


def test_fsdp_in_one_process_is_the_plain_model() -> None:
    """One process has nothing to shard: the fsdp switch leaves the module as it is (as ddp does)."""
    module = torch.nn.Linear(2, 2)
    assert wrap_for_training(module, SINGLE, TrainingConfig(distributed={"strategy": "fsdp"})) is module


def test_bf16_autocast_keeps_the_base_in_bf16_and_the_adapter_in_fp32(
    tiny_project: Path, tmp_path: Path
) -> None:
    """The GPU path (bf16 autocast) on CPU: half-size frozen base, fp32 trainables, disjoint steps."""
    trainer = Trainer(tiny_config(tiny_project, tmp_path, "training.precision=bf16"), SINGLE)
    trainable = {id(p) for members in trainer.model.parameter_groups().values() for _, p in members}
    frozen = [p for p in trainer.model.parameters() if id(p) not in trainable]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert [names[id(p)] for p in frozen if p.dtype != torch.bfloat16] == []
    assert frozen
    assert {p.dtype for members in trainer.model.parameter_groups().values() for _, p in members} == {
        torch.float32
    }
    trainer.schedule[:2] = ["caption", "instruction"]
    before = _snapshot(trainer)
    caption = train_step(trainer, measure=False)
    assert _changed(before["language"], trainer, "language") == []
    instruction = train_step(trainer, measure=False)
    assert torch.isfinite(torch.tensor([caption["loss/caption"], instruction["loss/instruction"]])).all()
    assert holdout_losses(trainer).keys() == {"caption", "instruction"}
