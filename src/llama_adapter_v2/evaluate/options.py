"""How much an evaluation run generates, and where it writes and logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_adapter_v2.data.records import CAPTION_INSTRUCTION

# MultiInstruct's sensitivity: the caption metric over several phrasings of the caption instruction
CAPTION_PHRASINGS: tuple[str, ...] = (
    CAPTION_INSTRUCTION,
    "Describe this image.",
    "Write a short caption for the picture.",
    "What does this image show?",
)


@dataclass(frozen=True)
class EvalOptions:
    """How much to generate; ``max_*`` cap the held-out samples (None: all of them)."""

    caption_tokens: int = 32
    instruction_tokens: int = 48
    batch_size: int = 16
    max_images: int | None = None
    max_instructions: int | None = None
    choice_files: tuple[Path, ...] = ()
    phrasings: tuple[str, ...] = CAPTION_PHRASINGS
    out_dir: Path | None = None
    run_id: str | None = None  # the training run: the scores go to a child run of it, never into it
    log_to_mlflow: bool = True
