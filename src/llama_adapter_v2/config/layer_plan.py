"""Which decoder layers take visual prompts and which take adaptation prompts (docs/METHOD.md §1, §3).

Derived once from the adapter config and the base's depth: the config loader checks it (so a
bad plan fails before any tensor exists) and ``build_model`` hands it to the model. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_adapter_v2.config.schema import AdapterConfig


class AdapterConfigError(ValueError):
    """The adapter config does not fit the base model; ``problems`` are (dotted key, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


@dataclass(frozen=True)
class LayerPlan:
    """Which decoder layers take visual prompts, which take adaptation prompts."""

    visual_layers: tuple[int, ...]
    prompt_layers: tuple[int, ...]
    additive: bool

    @property
    def uses_images(self) -> bool:
        return bool(self.visual_layers) or (self.additive and bool(self.prompt_layers))


def _depth_problems(adapter: AdapterConfig, n_layers: int) -> list[tuple[str, str]]:
    n_prompt = adapter.resolved_prompt_layers(n_layers)
    problems = []
    if n_prompt > n_layers:
        problems.append(("model.adapter.prompt_layers",
                         f"{n_prompt} prompt layers asked, the base model has {n_layers} layers"))
    if adapter.visual_layers > n_layers:
        asked = adapter.visual_layers
        problems.append(("model.adapter.visual_layers",
                         f"{asked} visual layers asked, the base model has {n_layers} layers"))
    return problems


def _additive_problems(adapter: AdapterConfig, prompt_layers: tuple[int, ...]) -> list[tuple[str, str]]:
    """Additive fusion (MM) adds the visual tokens to the adaptation prompts: both, of one length."""
    if adapter.prompt_len and not prompt_layers:
        return [("model.adapter.prompt_layers", "additive fusion needs at least one prompt layer")]
    if prompt_layers and adapter.visual.n_query != adapter.prompt_len:
        return [("model.adapter.visual.n_query",
                 f"additive fusion adds the {adapter.visual.n_query} visual tokens to the "
                 f"{adapter.prompt_len} adaptation prompt tokens; make them equal")]
    return []


def plan_layers(adapter: AdapterConfig, n_layers: int) -> LayerPlan:
    """Adaptation prompts in the last ``prompt_layers`` layers; early fusion's visual prompts in the
    first ``visual_layers`` (never the same layer); impossible requests raise AdapterConfigError."""
    if problems := _depth_problems(adapter, n_layers):
        raise AdapterConfigError(problems)
    n_prompt = adapter.resolved_prompt_layers(n_layers)
    prompt_layers = tuple(range(n_layers - n_prompt, n_layers)) if adapter.prompt_len else ()
    if adapter.visual_fusion == "additive":
        if problems := _additive_problems(adapter, prompt_layers):
            raise AdapterConfigError(problems)
        return LayerPlan(visual_layers=(), prompt_layers=prompt_layers, additive=True)
    visual_layers = tuple(range(adapter.visual_layers))
    if set(visual_layers) & set(prompt_layers):
        raise AdapterConfigError([("model.adapter.visual_layers",
                                   f"early fusion's first {adapter.visual_layers} visual layers overlap "
                                   f"the last {n_prompt} prompt layers of a {n_layers}-layer base model")])
    return LayerPlan(visual_layers=visual_layers, prompt_layers=prompt_layers, additive=False)
