"""The registry that builds experts by name (the interface they meet is ``infer.expert_text``).

Which experts run is chosen per request (docs/METHOD.md §1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.infer.expert_text import Expert

log = logging.getLogger(__name__)


class ExpertUnavailableError(RuntimeError):
    """An expert's binary, language data or model is missing."""


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

