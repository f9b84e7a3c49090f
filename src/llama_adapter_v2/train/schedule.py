"""Which task each optimizer step trains, and so which group it updates (docs/METHOD.md §4).

A caption step updates only the visual group, an instruction step only the language group
(``training.trainable: all`` updates every adapter parameter on every batch, as an ablation).
``schedule: joint`` shuffles the steps with a seed; ``two_phase`` runs all caption steps first,
as the released code does.
"""

from __future__ import annotations

import random

from llama_adapter_v2.config.schema import TrainingConfig
from llama_adapter_v2.data.records import Kind
from llama_adapter_v2.model.trainable import GROUPS, Group

Task = Kind
TASKS: tuple[Task, ...] = ("caption", "instruction")
GROUP_OF_TASK: dict[Task, Group] = {"caption": "visual", "instruction": "language"}


def task_schedule(training: TrainingConfig) -> list[Task]:
    """The task of every step: caption_ratio of them captions, seeded-shuffled (joint) or first."""
    n_caption = round(training.steps * training.caption_ratio)
    tasks: list[Task] = ["caption"] * n_caption + ["instruction"] * (training.steps - n_caption)
    if training.schedule == "joint":
        random.Random(training.seed).shuffle(tasks)
    return tasks


def active_groups(task: Task, training: TrainingConfig) -> list[Group]:
    return list(GROUPS) if training.trainable == "all" else [GROUP_OF_TASK[task]]


def steps_per_group(schedule: list[Task], training: TrainingConfig) -> dict[Group, int]:
    """How many optimizer steps each group will take: the length of its own lr schedule."""
    counts = dict.fromkeys(GROUPS, 0)
    for task in schedule:
        for group in active_groups(task, training):
            counts[group] += 1
    return counts
