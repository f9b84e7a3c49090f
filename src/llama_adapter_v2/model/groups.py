"""The one rule that puts every trainable parameter in exactly one group (METHOD.md section 4).

visual:   the visual path (clip_proj, visual_query, bridge blocks, visual_proj) and the gates of
          the layers fed by visual prompts alone (early fusion).
language: everything else that trains: adaptation prompts, gates of the prompt layers, norms,
          biases, scales and LoRA.

A caption batch trains the visual group, an instruction batch the language group. Under
additive fusion the visual tokens ride on the adaptation prompts, so every gate is a prompt
layer's gate and belongs to the language group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, cast, get_args

from torch import nn

Group = Literal["visual", "language"]
GROUPS: tuple[Group, ...] = get_args(Group)
VISUAL_PATH_PREFIX = "visual_bridge."
_GATE = re.compile(r"\.layers\.(\d+)\.self_attn\.gate$")


def group_of(name: str, visual_layers: frozenset[int]) -> Group:
    """The group of one adapter parameter, from its name and the layers fed by visual prompts."""
    if name.startswith(VISUAL_PATH_PREFIX):
        return "visual"
    gate = _GATE.search(name)
    if gate is not None and int(gate.group(1)) in visual_layers:
        return "visual"
    return "language"


def split_into_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], visual_layers: frozenset[int]
) -> dict[Group, list[tuple[str, nn.Parameter]]]:
    groups: dict[Group, list[tuple[str, nn.Parameter]]] = {group: [] for group in GROUPS}
    for name, parameter in named_parameters:
        groups[group_of(name, visual_layers)].append((name, parameter))
    return groups


def check_group_names(names: Iterable[str]) -> list[Group]:
    """Validate group names given by a caller (trainer, CLI); the error lists the valid ones."""
    chosen: list[Group] = []
    for name in names:
        if name not in GROUPS:
            raise ValueError(f"unknown parameter group {name!r}; the groups are {list(GROUPS)}")
        chosen.append(cast(Group, name))
    return chosen
