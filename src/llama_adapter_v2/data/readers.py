"""Readers for the formats users have: COCO captions, Alpaca, self-instruct seeds, LLaVA chats.

Two levels of trouble, two responses. A file that cannot be read as a whole (not UTF-8, broken
JSON, the wrong top-level type, a COCO file without ``annotations``) raises ``DataFormatError``
naming the file, the position and the rule. A single bad record (a missing key, a null caption)
is read anyway as a ``RawRecord`` listing its problems, so validation can quarantine it and
the other records go on; ``RawRecord.to_record`` refuses records that still have problems.

A UTF-8 byte-order mark at the start of a file is accepted and skipped: Windows editors write
it, and it carries no content.
"""

from __future__ import annotations

import codecs
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_adapter_v2.config.schema import CaptionSource, InstructionSource
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION, Kind, Record, Role, Template, Turn

IMAGE_TOKEN = "<image>"
LLAVA_ROLES: dict[str, Role] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataFormatError(ValueError):
    """A file or record that cannot be read, with the file, the record and the broken rule."""

    def __init__(self, file: Path | str, rule: str, detail: str, record: str | None = None):
        self.file, self.rule, self.detail, self.record = str(file), rule, detail, record
        where = f"{self.file}: record {record}" if record is not None else self.file
        super().__init__(f"{where}: {rule}: {detail}")


@dataclass
class RawRecord:
    """A record as read, before validation; text fields are None where the file had no value."""

    id: str
    source: str
    kind: Kind
    template: Template
    file: str
    index: int
    turns: list[tuple[Role, str | None]]
    input: str | None = ""
    image: str | None = None
    problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> Record:
        texts = [text for _, text in self.turns]
        if self.problems or any(not isinstance(text, str) for text in texts):
            problems = self.problems or ["a turn has no text"]
            raise DataFormatError(self.file, "record structure", "; ".join(problems), record=self.id)
        return Record(
            id=self.id,
            source=self.source,
            kind=self.kind,
            template=self.template,
            turns=tuple(Turn(role, text) for role, text in self.turns if text is not None),
            input=self.input or "",
            image=self.image,
            meta=self.meta,
        )


# --------------------------------------------------------------------------- whole files


def _decode_utf8(path: Path, data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        detail = f"byte 0x{data[err.start]:02x} at line {line}, column {column} ({err.reason})"
        raise DataFormatError(path, "valid UTF-8", detail) from None


def load_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors report line and column."""
    if not path.is_file():
        raise DataFormatError(path, "file exists", "no such file")
    text = _decode_utf8(path, path.read_bytes())
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            path, "JSON syntax", f"{err.msg} at line {err.lineno}, column {err.colno}"
        ) from None


def load_jsonl(path: Path) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); errors report the line and column."""
    if not path.is_file():
        raise DataFormatError(path, "file exists", "no such file")
    text = _decode_utf8(path, path.read_bytes())
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path, "JSON syntax", f"{err.msg} at line {number}, column {err.colno}"
            ) from None
    return items


def _expect_type(path: Path, value: Any, expected: type, what: str) -> None:
    if not isinstance(value, expected):
        detail = f"{what} must be a JSON {_json_name(expected)}, found {_json_name(type(value))}"
        raise DataFormatError(path, "top-level type", detail)


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        kind, "null" if kind is type(None) else kind.__name__
    )


def _text_field(item: dict[str, Any], key: str, problems: list[str], required: bool = True) -> str | None:
    """The string under ``key``; a missing key or a non-string value is noted as a problem."""
    if key not in item:
        if required:
            problems.append(f"missing key '{key}'")
        return None
    value = item[key]
    if value is not None and not isinstance(value, str):
        problems.append(f"'{key}' must be a string, found {_json_name(type(value))}")
        return None
    return value


# --------------------------------------------------------------------------- COCO captions


def read_coco(source: CaptionSource) -> list[RawRecord]:
    """One record per caption annotation; the image path is resolved through the image list."""
    path = Path(source.annotations)
    data = load_json(path)
    _expect_type(path, data, dict, "a COCO caption file")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataFormatError(path, "required keys", f"missing top-level key '{key}'")
        _expect_type(path, data[key], list, f"'{key}'")
    files_by_image: dict[Any, list[str]] = defaultdict(list)
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            rule, detail = "required keys", "an image entry needs 'id' and 'file_name'"
            raise DataFormatError(path, rule, detail, record=f"images[{position}]")
        files_by_image[image["id"]].append(str(image["file_name"]))
    return [_coco_record(source, path, i, ann, files_by_image) for i, ann in enumerate(data["annotations"])]


def _coco_record(
    source: CaptionSource, path: Path, index: int, ann: Any, files_by_image: dict[Any, list[str]]
) -> RawRecord:
    problems: list[str] = []
    if not isinstance(ann, dict):
        problems.append(f"an annotation must be an object, found {_json_name(type(ann))}")
        ann = {}
    for key in ("id", "image_id"):
        if key not in ann:
            problems.append(f"missing key '{key}'")
    caption = _text_field(ann, "caption", problems)
    files = files_by_image.get(ann.get("image_id"), [])
    image = str(Path(source.images) / files[0]) if len(files) == 1 else None
    return RawRecord(
        id=f"{source.name}:{ann.get('id', f'#{index}')}",
        source=source.name,
        kind="caption",
        template="alpaca",
        file=str(path),
        index=index,
        turns=[("user", CAPTION_INSTRUCTION), ("assistant", caption)],
        image=image,
        problems=problems,
        meta={"annotation_id": ann.get("id"), "image_id": ann.get("image_id"), "image_entries": len(files)},
    )


# --------------------------------------------------------------------------- instructions


def read_instructions(source: InstructionSource) -> list[RawRecord]:
    path = Path(source.path)
    if source.format == "alpaca":
        return read_alpaca(path, source.name)
    if source.format == "self_instruct":
        return read_self_instruct(path, source.name)
    return read_llava(path, source.name, source.image_root)


def _alpaca_like(path: Path, name: str, index: int, record_id: str, item: Any) -> RawRecord:
    problems: list[str] = []
    if not isinstance(item, dict):
        problems.append(f"a record must be an object, found {_json_name(type(item))}")
        item = {}
    instruction = _text_field(item, "instruction", problems)
    context = _text_field(item, "input", problems, required=False)
    output = _text_field(item, "output", problems)
    return RawRecord(
        id=record_id,
        source=name,
        kind="instruction",
        template="alpaca",
        file=str(path),
        index=index,
        turns=[("user", instruction), ("assistant", output)],
        input=context if context is not None else "",
        problems=problems,
    )


def read_alpaca(path: Path, name: str) -> list[RawRecord]:
    """Alpaca / GPT-4-LLM JSON: an array of {instruction, input, output} (``input`` optional)."""
    data = load_json(path)
    _expect_type(path, data, list, "an Alpaca file")
    return [_alpaca_like(path, name, i, f"{name}:{i}", item) for i, item in enumerate(data)]


def read_self_instruct(path: Path, name: str) -> list[RawRecord]:
    """Self-instruct seed tasks (JSONL), flattened: one Alpaca record per task instance."""
    records = []
    for index, task in enumerate(load_jsonl(path)):
        task_id = task.get("id", f"#{index}") if isinstance(task, dict) else f"#{index}"
        instances = task.get("instances") if isinstance(task, dict) else None
        if not isinstance(instances, list) or not instances:
            bad = RawRecord(
                id=f"{name}:{task_id}", source=name, kind="instruction", template="alpaca", file=str(path),
                index=index, turns=[("user", None), ("assistant", None)],
                problems=["'instances' must be a non-empty array"],
            )
            records.append(bad)
            continue
        for k, instance in enumerate(instances):
            has_instruction = isinstance(instance, dict) and "instruction" in task
            flat = {**instance, "instruction": task["instruction"]} if has_instruction else instance
            suffix = f"/{k}" if len(instances) > 1 else ""
            records.append(_alpaca_like(path, name, index, f"{name}:{task_id}{suffix}", flat))
    return records


def strip_image_token(text: str) -> tuple[str, bool]:
    """Remove ``<image>`` from the start or end of a turn (LLaVA puts it at either)."""
    stripped = text.strip()
    if stripped.startswith(IMAGE_TOKEN):
        return stripped[len(IMAGE_TOKEN) :].strip(), True
    if stripped.endswith(IMAGE_TOKEN):
        return stripped[: -len(IMAGE_TOKEN)].strip(), True
    return text, False


def conversation_template(turns: list[tuple[Role, str | None]]) -> Template:
    """One exchange is an instruction (Alpaca template), as inference asks a first question and as
    the released multimodal loader formats LLaVA's first turn; longer ones use the chat template."""
    return "alpaca" if [role for role, _ in turns] == ["user", "assistant"] else "chat"


def read_llava(path: Path, name: str, image_root: Path | None) -> list[RawRecord]:
    """LLaVA / ShareGPT: [{id, image?, conversations: [{from, value}, ...]}], every turn kept."""
    data = load_json(path)
    _expect_type(path, data, list, "a LLaVA file")
    return [_llava_record(path, name, image_root, i, item) for i, item in enumerate(data)]


def _llava_turns(conversations: Any, problems: list[str]) -> list[tuple[Role, str | None]]:
    if not isinstance(conversations, list) or not conversations:
        problems.append("'conversations' must be a non-empty array")
        return [("assistant", None)]
    turns: list[tuple[Role, str | None]] = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
            problems.append(f"conversations[{position}] needs 'from' in {sorted(LLAVA_ROLES)}")
            continue
        value = _text_field(turn, "value", problems)
        turns.append((LLAVA_ROLES[turn["from"]], value))
    roles = [role for role, _ in turns]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if roles != expected:
        problems.append("turns must alternate human, gpt, ... and end with gpt")
    return turns or [("assistant", None)]


def _llava_record(path: Path, name: str, image_root: Path | None, index: int, item: Any) -> RawRecord:
    problems: list[str] = []
    if not isinstance(item, dict):
        problems.append(f"a record must be an object, found {_json_name(type(item))}")
        item = {}
    if "conversations" not in item:
        problems.append("missing key 'conversations'")
    turns = _llava_turns(item.get("conversations"), problems)
    image_name = _text_field(item, "image", problems, required=False)
    had_token = False
    if turns and turns[0][0] == "user" and isinstance(turns[0][1], str):
        text, had_token = strip_image_token(turns[0][1])
        turns[0] = ("user", text)
    if had_token and not image_name:
        problems.append("'<image>' in the first turn but no 'image' key")
    image = None
    if image_name:
        image = str(Path(image_root) / image_name) if image_root is not None else image_name
    return RawRecord(
        id=f"{name}:{index}",
        source=name,
        kind="instruction",
        template=conversation_template(turns),
        file=str(path),
        index=index,
        turns=turns,
        image=image,
        problems=problems,
        meta={"original_id": item.get("id")},
    )
