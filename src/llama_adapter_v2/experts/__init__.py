"""Experts: models that turn an image into text for the prompt's input slot (OCR, captions)."""

from llama_adapter_v2.experts import caption, ocr  # noqa: F401 - register "caption" and "ocr"
from llama_adapter_v2.experts.base import (
    ExpertUnavailableError,
    build_expert,
    build_experts,
    register_expert,
    registered_experts,
)

__all__ = [
    "ExpertUnavailableError",
    "build_expert",
    "build_experts",
    "register_expert",
    "registered_experts",
]
