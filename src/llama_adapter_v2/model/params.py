"""Trainable parameter counts per group and per kind (docs/METHOD.md §6), from the declarations."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.quantize import QuantizedLinear
from llama_adapter_v2.model.trainable import GROUPS, KINDS, Group, Kind


@dataclass(frozen=True)
class ParameterCounts:
    """Counts of one built model; ``base`` is the frozen Llama, ``vision_tower`` the frozen CLIP."""

    by_group: dict[Group, int]
    by_kind: dict[Kind, int]
    by_group_and_kind: dict[Group, dict[Kind, int]]
    trainable: int
    base: int
    vision_tower: int

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable / self.base

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "percent_of_base": self.percent_of_base}


def count_parameters(model: LlamaAdapterV2) -> ParameterCounts:
    """Works on the meta device: only shapes are read."""
    by_group_and_kind: dict[Group, dict[Kind, int]] = {g: dict.fromkeys(KINDS, 0) for g in GROUPS}
    adapter_ids: set[int] = set()
    for _, parameter, trainable in model.adapter_parameters():
        by_group_and_kind[trainable.group][trainable.kind] += parameter.numel()
        adapter_ids.add(id(parameter))
    by_group = {g: sum(kinds.values()) for g, kinds in by_group_and_kind.items()}
    by_kind = {k: sum(by_group_and_kind[g][k] for g in GROUPS) for k in KINDS}
    tower = sum(p.numel() for p in model.clip.parameters()) if model.clip is not None else 0
    stored_quantised = _quantized_storage(model)
    base = sum(p.numel() for p in model.base.parameters() if id(p) not in adapter_ids | stored_quantised)
    base += sum(layer.in_features * layer.out_features for layer in model.base.modules()
                if isinstance(layer, QuantizedLinear))  # a quantised weight counts as the weights it stores
    norms = by_kind["norm"]  # the norms are base weights that the method unfreezes
    return ParameterCounts(
        by_group=by_group,
        by_kind=by_kind,
        by_group_and_kind=by_group_and_kind,
        trainable=sum(by_group.values()),
        base=base + norms,
        vision_tower=tower,
    )


def _quantized_storage(model: LlamaAdapterV2) -> set[int]:
    return {id(stored) for layer in model.base.modules() if isinstance(layer, QuantizedLinear)
            for stored in layer.storage()}
