"""What an expert is to inference: something that turns an image into text for the input slot.

Experts are the paper's plug-ins (docs/METHOD.md §1): their text describes the image to the
language model through the template's input slot, so a stronger captioner or an OCR engine adds
knowledge without retraining the adapter. Building experts by name is ``experts/``'s job; chat
and generation only need this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Expert(Protocol):
    """Turns an image into text that is placed in the prompt's input slot."""

    name: str
    label: str

    def describe(self, image: Image.Image) -> str: ...


def expert_context(experts: Sequence[Expert], image: Image.Image | None, given_input: str = "") -> str:
    """The text for the input slot: the caller's input, then one labelled line per expert."""
    lines = [given_input.strip()] if given_input.strip() else []
    if image is not None:
        for expert in experts:
            text = expert.describe(image).strip()
            if text:
                lines.append(f"{expert.label}: {text}")
    return "\n".join(lines)
