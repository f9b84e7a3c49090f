"""What trains, declared once (docs/METHOD.md §4 and §5).

Every adapter module says which of its parameters train, in which group and whether AdamW
decays them, through ``adapter_params()`` (as torchtune's adapter modules do). The model
collects those declarations; groups, optimizers, counts, folding and checkpoints all read
them, so no name pattern or type list elsewhere decides what trains.

visual:   the visual path and the gates of the layers fed by visual prompts alone (early fusion).
language: everything else that trains: adaptation prompts, their gates, norms, biases, scales, LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast, get_args

from torch import nn

Group = Literal["visual", "language"]
GROUPS: tuple[Group, ...] = get_args(Group)
Kind = Literal["bias", "scale", "norm", "prompt", "gate", "visual", "lora"]
KINDS: tuple[Kind, ...] = get_args(Kind)


@dataclass(frozen=True)
class Trainable:
    """How one adapter parameter trains: its group, what it is, and whether weight decay applies.

    Decay follows MM (docs/METHOD.md §5): matrices decay; biases, scales, norms and gates do not.
    """

    group: Group
    kind: Kind
    decays: bool


class AdapterModule(nn.Module):
    """Base of the modules the method adds: each names its trainable parameters, relative to itself.

    A base class rather than a Protocol: the model asks every submodule at every step, and a plain
    ``isinstance`` costs well under a microsecond where a runtime Protocol check costs ~25.
    """

    def adapter_params(self) -> dict[str, Trainable]:
        raise NotImplementedError(f"{type(self).__name__} must declare its trainable parameters")


class AdapterParameter(NamedTuple):
    """One declared parameter of a whole model, by its full name."""

    name: str
    parameter: nn.Parameter
    trainable: Trainable


def check_group_names(names: Iterable[str]) -> list[Group]:
    """Validate group names given by a caller (trainer, CLI); the error lists the valid ones."""
    chosen: list[Group] = []
    for name in names:
        if name not in GROUPS:
            raise ValueError(f"unknown parameter group {name!r}; the groups are {list(GROUPS)}")
        chosen.append(cast(Group, name))
    return chosen
