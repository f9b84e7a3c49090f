"""The expert interface (image -> text) and the registry that builds experts by name.

Experts are the paper's plug-ins (METHOD.md section 1): their text describes the image to the
language model through the template's input slot, so a stronger captioner or an OCR engine adds
knowledge without retraining the adapter. Which experts run is chosen per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from PIL import Image

from llama_adapter_v2.config.schema import ExpertConfig

log = logging.getLogger(__name__)


class ExpertUnavailableError(RuntimeError):
    """An expert's binary, language data or model is missing."""


@runtime_checkable
class Expert(Protocol):
    """Turns an image into text that is placed in the prompt's input slot."""

    name: str
    label: str

    def describe(self, image: Image.Image) -> str: ...


ExpertFactory = Callable[[ExpertConfig], Expert]
_FACTORIES: dict[str, ExpertFactory] = {}


def register_expert(kind: str) -> Callable[[ExpertFactory], ExpertFactory]:
    """Register a factory under ``kind`` (the ``kind`` of an ``ExpertConfig``)."""

    def add(factory: ExpertFactory) -> ExpertFactory:
        if kind in _FACTORIES:
            raise ValueError(f"an expert named {kind!r} is already registered")
        _FACTORIES[kind] = factory
        return factory

    return add


def registered_experts() -> list[str]:
    return sorted(_FACTORIES)


def build_expert(cfg: ExpertConfig) -> Expert | None:
    """The configured expert; None with a warning if it is unavailable and marked optional."""
    if cfg.kind not in _FACTORIES:
        raise ValueError(f"unknown expert {cfg.kind!r}; registered: {registered_experts()}")
    try:
        return _FACTORIES[cfg.kind](cfg)
    except ExpertUnavailableError as error:
        if not cfg.optional:
            raise
        log.warning("optional expert %r skipped: %s", cfg.kind, error)
        return None


def build_experts(cfgs: Sequence[ExpertConfig]) -> list[Expert]:
    return [expert for expert in (build_expert(cfg) for cfg in cfgs) if expert is not None]


def expert_context(experts: Sequence[Expert], image: Image.Image | None, given_input: str = "") -> str:
    """The text for the input slot: the caller's input, then one labelled line per expert."""
    lines = [given_input.strip()] if given_input.strip() else []
    if image is not None:
        for expert in experts:
            text = expert.describe(image).strip()
            if text:
                lines.append(f"{expert.label}: {text}")
    return "\n".join(lines)
