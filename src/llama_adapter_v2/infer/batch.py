"""Batch inference: a JSONL file of requests answered in one model load, one JSON line each.

A request is ``{"prompt": text, "image": path?, "input": text?, "id": any?}``. Every line gets
an answer line in the same order: ``{"line", "id"?, "text"}`` or, for a line that cannot be
answered (bad JSON, no prompt, an image that is missing, unreadable or outside the image root),
``{"line", "id"?, "error"}`` naming the line and the rule; the other lines are still answered.
Image paths resolve against ``image_root`` (the requests file's folder by default) and must stay
inside it, symlinks included: a request file cannot make the model read an arbitrary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from llama_adapter_v2.infer.generation import (
    GenerationSettings,
    Prompt,
    generate_texts,
    instruction_prompt,
)


class RequestError(ValueError):
    """One request line that cannot be answered; the message names the rule."""


@dataclass(frozen=True)
class Request:
    line: int
    request_id: Any
    prompt: Prompt


def _image_path(value: Any, image_root: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise RequestError("image_not_a_path: 'image' must be a non-empty path string")
    path = (image_root / value).resolve()
    if not path.is_relative_to(image_root.resolve()):
        raise RequestError(f"image_outside_root: {value!r} resolves outside the image root {image_root}")
    if not path.is_file():
        raise RequestError(f"image_missing: {value!r} is not a file under {image_root}")
    return path


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as raw:
            return raw.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise RequestError(f"image_unreadable: {path.name}: {err}") from None


def parse_request(text: str, line: int, image_root: Path) -> Request:
    """One request line; raises ``RequestError`` with the broken rule."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"bad_json: {err.msg} at column {err.colno}") from None
    if not isinstance(data, dict):
        raise RequestError(f"not_an_object: a request is a JSON object, found {type(data).__name__}")
    prompt, context = data.get("prompt"), data.get("input", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt_missing: 'prompt' must be a non-empty string")
    if not isinstance(context, str):
        raise RequestError("input_not_text: 'input' must be a string when given")
    image = None
    if data.get("image") is not None:
        image = _read_image(_image_path(data["image"], image_root))
    return Request(line, data.get("id"), instruction_prompt(prompt, context, image))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield number, text


def _row(line: int, request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"line": line, **({"id": request_id} if request_id is not None else {}), **fields}


def answer_requests(
    model: Any, tokenizer: Any, requests_path: Path, out_path: Path, *, settings: GenerationSettings,
    image_root: Path | None = None,
) -> tuple[int, int]:
    """Answer every line of ``requests_path`` into ``out_path`` (written atomically); (answered, errors)."""
    root = image_root if image_root is not None else requests_path.resolve().parent
    rows: dict[int, dict[str, Any]] = {}
    good: list[Request] = []
    for line, text in _lines(requests_path):
        try:
            good.append(parse_request(text, line, root))
        except RequestError as err:
            request_id = _id_of(text)
            rows[line] = _row(line, request_id, error=f"{requests_path}:{line}: {err}")
    texts = generate_texts(model, tokenizer, [r.prompt for r in good], settings) if good else []
    for request, answer in zip(good, texts, strict=True):
        rows[request.line] = _row(request.line, request.request_id, text=answer)
    _write_jsonl_atomic(out_path, [rows[line] for line in sorted(rows)])
    return len(good), len(rows) - len(good)


def _id_of(text: str) -> Any:
    """The request's id when the line is a JSON object with one (errors keep it too)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data.get("id") if isinstance(data, dict) else None


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
