"""Readers for the formats users have: COCO captions, Alpaca, self-instruct seeds, LLaVA chats.

Two levels of trouble, two responses. A file that cannot be read as a whole (not UTF-8, broken
JSON, the wrong top-level type, a COCO file without ``annotations``) raises ``DataFormatError``
naming the file, the position and the rule. A single bad record (a missing key, a null caption)
is read anyway as a ``RawRecord`` listing its problems, so validation can quarantine it and
the other records go on; ``RawRecord.to_record`` refuses records that still have problems.

A UTF-8 byte-order mark at the start of a file is accepted and skipped: Windows editors write
it, and it carries no content.

Readers touch no file but the one they parse: an image path is joined to its source's root and
kept with that root (``RawRecord.image_root``), and validation resolves it, symlinks included,
before anything opens it (``data.containment``). A LLaVA source without ``image_root`` has the
folder of its JSON file as root.
"""

from __future__ import annotations

import codecs
import json
from collections import defaultdict
from collections.abc import Hashable
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
    image_root: str | None = None

    @property
    def structure_problems(self) -> list[str]:
        """The reader's problems plus every turn without text (a null value is not a missing key)."""
        return self.problems + [f"turn {i} has no text" for i in self.turns_without_text]

    @property
    def turns_without_text(self) -> list[int]:
        return [i for i, (_, text) in enumerate(self.turns) if not isinstance(text, str)]

    def to_record(self) -> Record:
        if self.structure_problems:
            detail = "; ".join(self.structure_problems)
            raise DataFormatError(self.file, "record structure", detail, record=self.id)
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


def _parse_json(path: Path, text: str, line: int | None = None) -> Any:
    """``json.loads`` whose every failure is a ``DataFormatError``: syntax (line and column), nesting
    deeper than the parser's recursion limit, and integers longer than Python converts (4300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line if line is not None else err.lineno}, column {err.colno}"
        raise DataFormatError(path, "JSON syntax", f"{err.msg} at {where}") from None
    except RecursionError:
        where = f" (line {line})" if line is not None else ""
        detail = f"arrays/objects nested too deeply{where}"
        raise DataFormatError(path, "JSON nesting depth", detail) from None
    except ValueError as err:  # int_max_str_digits
        where = f" (line {line})" if line is not None else ""
        raise DataFormatError(path, "JSON number size", f"{err}{where}") from None


def load_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors report line and column."""
    if not path.is_file():
        raise DataFormatError(path, "file exists", "no such file")
    return _parse_json(path, _decode_utf8(path, path.read_bytes()))


def load_jsonl(path: Path) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); errors report the line and column."""
    if not path.is_file():
        raise DataFormatError(path, "file exists", "no such file")
    text = _decode_utf8(path, path.read_bytes())
    return [_parse_json(path, line, number) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()]


def _expect_type(path: Path, value: Any, expected: type, what: str) -> None:
    if not isinstance(value, expected):
        detail = f"{what} must be a JSON {_json_name(expected)}, found {_json_name(type(value))}"
        raise DataFormatError(path, "top-level type", detail)


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        kind, "null" if kind is type(None) else kind.__name__
    )


def _is_key(value: Any) -> bool:
    """Ids must be JSON numbers or strings: they become dict keys and parts of record ids."""
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def _id_text(value: Any, fallback: str) -> str:
    return str(value) if _is_key(value) else fallback


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


@dataclass(frozen=True)
class CocoListing:
    """A COCO file as read: one record per annotation, and the listed images no annotation uses."""

    records: list[RawRecord]
    images_without_captions: list[Hashable]


def read_coco(source: CaptionSource) -> list[RawRecord]:
    """One record per caption annotation; the image path is resolved through the image list."""
    return read_coco_listing(source).records


def _image_index(path: Path, images: list[Any]) -> dict[Hashable, list[str]]:
    """image id -> its file names. The list is the file's table of contents: a broken entry stops it."""
    files_by_image: dict[Hashable, list[str]] = defaultdict(list)
    for position, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            rule, detail = "required keys", "an image entry needs 'id' and 'file_name'"
            raise DataFormatError(path, rule, detail, record=f"images[{position}]")
        if not _is_key(image["id"]) or not isinstance(image["file_name"], str):
            detail = (f"'id' must be a number or string and 'file_name' a string, found "
                      f"{_json_name(type(image['id']))} and {_json_name(type(image['file_name']))}")
            raise DataFormatError(path, "image entry types", detail, record=f"images[{position}]")
        files_by_image[image["id"]].append(image["file_name"])
    return files_by_image


def read_coco_listing(source: CaptionSource) -> CocoListing:
    """``read_coco`` plus the ids of listed images that have no caption (reported, not dropped)."""
    path = Path(source.annotations)
    data = load_json(path)
    _expect_type(path, data, dict, "a COCO caption file")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataFormatError(path, "required keys", f"missing top-level key '{key}'")
        _expect_type(path, data[key], list, f"'{key}'")
    files_by_image = _image_index(path, data["images"])
    annotations = data["annotations"]
    records = [_coco_record(source, path, i, ann, files_by_image) for i, ann in enumerate(annotations)]
    captioned = {raw.meta["image_id"] for raw in records if _is_key(raw.meta["image_id"])}
    return CocoListing(records, [image_id for image_id in files_by_image if image_id not in captioned])


def _coco_record(
    source: CaptionSource, path: Path, index: int, ann: Any, files_by_image: dict[Hashable, list[str]]
) -> RawRecord:
    problems: list[str] = []
    if not isinstance(ann, dict):
        problems.append(f"an annotation must be an object, found {_json_name(type(ann))}")
        ann = {}
    for key in ("id", "image_id"):
        if key not in ann:
            problems.append(f"missing key '{key}'")
        elif not _is_key(ann[key]):
            problems.append(f"'{key}' must be a number or string, found {_json_name(type(ann[key]))}")
    caption = _text_field(ann, "caption", problems)
    annotation_id = ann.get("id") if _is_key(ann.get("id")) else None
    image_id = ann.get("image_id") if _is_key(ann.get("image_id")) else None
    files = files_by_image.get(image_id, []) if image_id is not None else []
    image = str(Path(source.images) / files[0]) if len(files) == 1 else None
    return RawRecord(
        id=f"{source.name}:{_id_text(annotation_id, f'#{index}')}",
        source=source.name,
        kind="caption",
        template="alpaca",
        file=str(path),
        index=index,
        turns=[("user", CAPTION_INSTRUCTION), ("assistant", caption)],
        image=image,
        image_root=str(source.images),
        problems=problems,
        meta={"annotation_id": annotation_id, "image_id": image_id, "image_entries": len(files)},
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
        task_id = _id_text(task.get("id"), f"#{index}") if isinstance(task, dict) else f"#{index}"
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
    """LLaVA / ShareGPT: [{id, image?, conversations: [{from, value}, ...]}], every turn kept.

    Images are looked up under ``image_root``, or beside the JSON file when it is None.
    """
    data = load_json(path)
    _expect_type(path, data, list, "a LLaVA file")
    root = Path(image_root) if image_root is not None else Path(path).parent
    return [_llava_record(path, name, root, i, item) for i, item in enumerate(data)]


def _llava_turns(conversations: Any, problems: list[str]) -> list[tuple[Role, str | None]]:
    if not isinstance(conversations, list) or not conversations:
        problems.append("'conversations' must be a non-empty array")
        return [("assistant", None)]
    turns: list[tuple[Role, str | None]] = []
    for position, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in LLAVA_ROLES:
            problems.append(f"conversations[{position}] needs 'from' in {sorted(LLAVA_ROLES)}")
            continue
        value = _text_field(turn, "value", problems)
        turns.append((LLAVA_ROLES[speaker], value))
    roles = [role for role, _ in turns]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if roles != expected:
        problems.append("turns must alternate human, gpt, ... and end with gpt")
    return turns or [("assistant", None)]


def _llava_record(path: Path, name: str, image_root: Path, index: int, item: Any) -> RawRecord:
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
    image = str(image_root / image_name) if image_name else None
    return RawRecord(
        id=f"{name}:{index}",
        source=name,
        kind="instruction",
        template=conversation_template(turns),
        file=str(path),
        index=index,
        turns=turns,
        image=image,
        image_root=str(image_root),
        problems=problems,
        meta={"original_id": item.get("id") if _is_key(item.get("id")) else None},
    )
