"""Experts: models that turn an image into text for the prompt's input slot (OCR, captions)."""

from llama_adapter_v2.experts import caption, ocr  # noqa: F401 - register "caption" and "ocr"
from llama_adapter_v2.experts.base import (
    Expert,
    ExpertUnavailableError,
    build_expert,
    build_experts,
    expert_context,
    register_expert,
    registered_experts,
)

__all__ = [
    "Expert",
    "ExpertUnavailableError",
    "build_expert",
    "build_experts",
    "expert_context",
    "register_expert",
    "registered_experts",
]
