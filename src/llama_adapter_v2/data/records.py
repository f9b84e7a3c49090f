"""The one record type every reader produces and every later stage consumes.

A caption, an Alpaca instruction and a multi-turn conversation are all a ``Record``: who said
what (``turns``), an optional image, and which prompt template renders them. Keeping one type
means shards, validation and the loader never branch on where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

Role = Literal["user", "assistant"]
Kind = Literal["caption", "instruction"]
Template = Literal["alpaca", "chat"]
CAPTION_INSTRUCTION = "Generate caption of this image"


@dataclass(frozen=True)
class Turn:
    """One utterance; only ``assistant`` turns carry loss."""

    role: Role
    text: str


@dataclass(frozen=True)
class Record:
    """One training example, whatever its source format.

    ``template="alpaca"`` records have exactly one user turn (the instruction) and one assistant
    turn (the response), with the optional ``input`` as context; ``template="chat"`` records
    alternate user and assistant turns, all of them kept. ``image`` is a path (or None).
    """

    id: str
    source: str
    kind: Kind
    template: Template
    turns: tuple[Turn, ...]
    input: str = ""
    image: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.turns or self.turns[-1].role != "assistant":
            raise ValueError(f"record {self.id}: the last turn must be the assistant's")
        if self.template == "alpaca" and [t.role for t in self.turns] != ["user", "assistant"]:
            raise ValueError(f"record {self.id}: an alpaca record has one user and one assistant turn")

    @property
    def instruction(self) -> str:
        return self.turns[0].text

    @property
    def response(self) -> str:
        """The last assistant answer (the reference for evaluation)."""
        return self.turns[-1].text

    @property
    def split_key(self) -> str:
        """What the train/holdout split hashes: the image file name for captions (so no image is in
        both splits, wherever the clone lives), else the id."""
        return PurePath(self.image).name if self.kind == "caption" and self.image else self.id

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "kind": self.kind,
            "template": self.template,
            "image": self.image,
            "input": self.input,
            "turns": [{"role": t.role, "text": t.text} for t in self.turns],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            id=data["id"],
            source=data["source"],
            kind=data["kind"],
            template=data["template"],
            image=data.get("image"),
            input=data.get("input", ""),
            turns=tuple(Turn(t["role"], t["text"]) for t in data["turns"]),
            meta=data.get("meta", {}),
        )


def caption_record(record_id: str, source: str, caption: str, image: str, meta: dict[str, Any]) -> Record:
    """Captions are Alpaca records with the fixed caption instruction (docs/METHOD.md §5)."""
    return Record(
        id=record_id,
        source=source,
        kind="caption",
        template="alpaca",
        turns=(Turn("user", CAPTION_INSTRUCTION), Turn("assistant", caption)),
        image=image,
        meta=meta,
    )
