"""Coverage-guided fuzz target (atheris, libFuzzer) for the data readers and validation's row facts.

Each input is one byte choosing the format (COCO, Alpaca, self-instruct, LLaVA) and the bytes of
the file. What must hold, or the run stops with the input saved as ``crash-*``:
- the reader returns records or raises ``DataFormatError`` naming the file and a rule; nothing else;
- it returns one record per annotation / array item / task instance (none lost);
- validation's rows (image checks under a root with a good PNG and a symlink out of it, control
  characters, UTF-8, duplicates, tokens) exist for every record, no image outside the root is
  opened, and a record with no structure problem converts to a ``Record``.

    pip install -e '.[fuzz]'
    python fuzz/readers_fuzz.py -max_total_time=300 -max_len=4096 -dict=fuzz/readers.dict \
        fuzz/corpus fuzz/seeds

``fuzz/corpus`` (git-ignored) collects the inputs that reached new code; ``fuzz/seeds`` holds valid
starting files. ``check_one`` needs no atheris: tests/test_fuzz_target.py runs it on the seeds.
"""

from __future__ import annotations

import codecs
import gc
import inspect
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from llama_adapter_v2.config.schema import CaptionSource, ValidationConfig
from llama_adapter_v2.data.readers import (
    DataFormatError,
    RawRecord,
    read_alpaca,
    read_coco,
    read_llava,
    read_self_instruct,
)
from llama_adapter_v2.data.validation import TokenCounter, caption_rows, instruction_rows

FORMATS = ("coco", "alpaca", "self_instruct", "llava")
# Coverage is measured in the project's own code: atheris.instrument_all() would patch every loaded
# function (pydantic, PIL, numpy: minutes before the first input).
INSTRUMENTED = ("llama_adapter_v2.",)
LIMITS = ValidationConfig(max_image_pixels=1_000_000)


class Workspace:
    """A folder with ``images/`` (a good PNG, a symlink leading out) and ``outside/secret.png``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.images = folder / "images"
        self.outside = folder / "outside"
        self.images.mkdir(parents=True, exist_ok=True)
        self.outside.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
        for path in (self.images / "0.png", self.outside / "secret.png"):
            path.write_bytes(buffer.getvalue())
        if not (self.images / "link.png").is_symlink():
            (self.images / "link.png").symlink_to(self.outside / "secret.png")
        self.opened: list[str] | None = None
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and self.opened is not None and isinstance(args[0], str | bytes | os.PathLike):
            self.opened.append(os.fsdecode(args[0]))


def _expected_count(fmt: str, payload: bytes) -> int | None:
    """Records the file should give, from an independent parse; None if it does not parse."""
    try:
        text = payload.removeprefix(codecs.BOM_UTF8).decode("utf-8")
        if fmt == "self_instruct":
            tasks = [json.loads(line) for line in text.splitlines() if line.strip()]
            instances = [task.get("instances") if isinstance(task, dict) else None for task in tasks]
            return sum(len(found) if isinstance(found, list) and found else 1 for found in instances)
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if fmt == "coco":
        annotations = data.get("annotations") if isinstance(data, dict) else None
        return len(annotations) if isinstance(annotations, list) else None
    return len(data) if isinstance(data, list) else None


def _read(fmt: str, path: Path, workspace: Workspace) -> list[RawRecord]:
    if fmt == "coco":
        return read_coco(CaptionSource(name="f", annotations=path, images=workspace.images))
    if fmt == "alpaca":
        return read_alpaca(path, "f")
    if fmt == "self_instruct":
        return read_self_instruct(path, "f")
    return read_llava(path, "f", workspace.images)


def check_one(data: bytes, workspace: Workspace) -> None:
    """One fuzz input; raises AssertionError (or whatever escapes) when a property breaks."""
    if not data:
        return
    fmt, payload = FORMATS[data[0] % len(FORMATS)], data[1:]
    path = workspace.folder / f"input-{fmt}.json"
    path.write_bytes(payload)
    try:
        records = _read(fmt, path, workspace)
    except DataFormatError as err:
        assert err.file == str(path) and err.rule and str(path) in str(err), err
        return
    expected = _expected_count(fmt, payload)
    assert expected is not None and len(records) == expected, (fmt, expected, len(records))
    workspace.opened = []
    try:
        if fmt == "coco":
            rows = caption_rows(records, LIMITS)
        else:
            rows = instruction_rows(records, LIMITS, TokenCounter(None))
    finally:
        opened, workspace.opened = workspace.opened, None
    assert len(rows) == len(records)
    outside = workspace.outside.resolve()
    leaked = [p for p in opened if Path(os.path.realpath(p)).is_relative_to(outside)]
    assert not leaked, leaked
    for raw in records:
        if not raw.structure_problems:
            raw.to_record()


def main() -> None:
    import atheris

    workspace = Workspace(Path(tempfile.mkdtemp(prefix="lav2-fuzz-")))
    for function in [obj for obj in gc.get_objects() if inspect.isfunction(obj)]:
        if (function.__module__ or "").startswith(INSTRUMENTED):
            atheris.instrument_func(function)  # patches the code object in place: every caller sees it
    atheris.Setup(sys.argv, lambda data: check_one(data, workspace))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
