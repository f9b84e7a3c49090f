"""A corpus of bad inputs, kept outside the project, through prepare and validate as a user runs them.

The project (``project/``) has a COCO file, an Alpaca file and a LLaVA file; a sibling folder
(``outside/``) holds a real PNG and a secret file. Records whose image escapes the root (``..``,
an absolute path, a symlink in the image folder) point at the *real* outside PNG: had the check
let them through, they would be clean. An audit hook records every file opened during the run and
proves nothing under ``outside/`` was; it also sees the good images opened, so it is listening.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from data_docs import page_text, validation_pages
from PIL import Image

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.schema import CaptionSource, InstructionSource
from llama_adapter_v2.data import pipeline

OPENED: list[str] | None = None  # the audit hook appends here while a run is being watched


def _record_open(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], str | bytes | os.PathLike):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)  # audit hooks cannot be removed: it records only while OPENED is a list


def png(colour: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (IHDR, CRC recomputed) claims width x height."""
    data = bytearray(png("red", (1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


GOOD_CAPTION = "A red square on white."
# (annotation id, image id, caption, the rules it must break; empty: it must be clean)
COCO_ANNOTATIONS: list[tuple[int, int, str, set[str]]] = [
    (1, 1, GOOD_CAPTION, set()),
    (2, 2, "Its file name climbs out with '..'.", {"image inside its source root"}),
    (3, 3, "Its file name is an absolute path outside.", {"image inside its source root"}),
    (4, 4, "Its file is a symlink pointing outside.", {"image inside its source root"}),
    (5, 5, "Its PNG is cut short.", {"image file complete"}),
    (6, 6, "Its header claims 30000 x 30000 pixels.", {"image within the pixel limit"}),
    (7, 1, "A NUL \x00 byte inside.", {"text free of control characters"}),
    (8, 1, "A bell \x07 and a DEL \x7f.", {"text free of control characters"}),
    (9, 1, "A lone surrogate \ud800 here.", {"valid UTF-8"}),
    (10, 99, "Its image is not listed.", {"annotation points at a listed image"}),
    (11, 1, GOOD_CAPTION, {"not an exact duplicate"}),
    (12, 8, "A blue square,\twith a tab and\na newline.", set()),
    (13, 8, "A carriage\r return.", {"text free of control characters"}),
    (14, 9, "Its file name holds a NUL.", {"text free of control characters"}),
    (15, 10, "Its file is the secret, reached by '..'.", {"image inside its source root"}),
]
ALPACA: list[tuple[dict[str, Any], set[str]]] = [
    ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, set()),
    ({"instruction": "Say \x00 nothing.", "input": "", "output": "ok"}, {"text free of control characters"}),
    ({"instruction": "Colour?", "input": "", "output": "Red \x1b[31m."}, {"text free of control characters"}),
    ({"instruction": "Echo.", "input": "\udc00", "output": "x"}, {"valid UTF-8"}),
    ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, {"not an exact duplicate"}),
    ({"instruction": "List two.", "input": "", "output": "one\ttwo\nthree"}, set()),
]


def chat(image: str | None, *turns: str) -> dict[str, Any]:
    conversations = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    if image is not None:
        conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return {"id": f"c{len(turns)}", **({"image": image} if image is not None else {}),
            "conversations": conversations}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad-corpus")
    outside, project = base / "outside", base / "project"
    images = project / "coco" / "images"
    outside.mkdir()
    images.mkdir(parents=True)
    (outside / "outside.png").write_bytes(png("green"))  # a good image: only the root check stops it
    (outside / "secret.txt").write_text("not for the data set\n")
    for name, content in {"good.png": png("red"), "good2.png": png("blue"),
                          "truncated.png": png("red", (64, 64))[:-40], "bomb.png": bomb_png(30000, 30000),
                          "uncaptioned.png": png("gray")}.items():
        (images / name).write_bytes(content)
    (images / "link.png").symlink_to(outside / "outside.png")
    coco_images = [
        (1, "good.png"), (2, "../../../outside/outside.png"), (3, str(outside / "outside.png")),
        (4, "link.png"), (5, "truncated.png"), (6, "bomb.png"), (7, "uncaptioned.png"), (8, "good2.png"),
        (9, "good.png\x00.txt"), (10, "../../../outside/secret.txt"),
    ]
    document = {"images": [{"id": i, "file_name": name} for i, name in coco_images],
                "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c, _ in COCO_ANNOTATIONS]}
    (project / "coco" / "captions.json").write_text(json.dumps(document))  # ASCII: \ud800 as an escape
    (project / "alpaca.json").write_text(json.dumps([item for item, _ in ALPACA]))
    chats = [
        chat("good.png", "What is it?", "A red square."),
        chat("../../outside/outside.png", "What is it?", "Green."),
        chat(str(outside / "outside.png"), "And this?", "Green again."),
        chat("link.png", "Through the link?", "Green, through a link."),
        chat("good2.png", "Colour?", "Blue.", "Sure?", "Yes\x0c."),
        chat(None, "Hello.", "Hi."),
    ]
    (project / "llava.json").write_text(json.dumps(chats))
    return {"outside": outside, "project": project, "images": images}


LLAVA_RULES: list[set[str]] = [set(), *[{"image inside its source root"}] * 3,
                               {"text free of control characters"}, set()]


@pytest.fixture(scope="module")
def run(corpus: dict[str, Path], demo_data_config: Config) -> dict[str, Any]:
    global OPENED  # noqa: PLW0603 - the audit hook's switch
    project = corpus["project"]
    cfg = demo_data_config.model_copy(deep=True)
    cfg.data.captions = [CaptionSource(name="coco", annotations=project / "coco" / "captions.json",
                                       images=corpus["images"])]
    cfg.data.instructions = [
        InstructionSource(name="alpaca", format="alpaca", path=project / "alpaca.json"),
        InstructionSource(name="llava", format="llava", path=project / "llava.json",
                          image_root=corpus["images"]),
    ]
    cfg.data.work_dir = project / "work"
    cfg.data.validation.max_failure_fraction = 1.0
    OPENED = []
    try:
        pipeline.prepare(cfg, project)
        summary = pipeline.validate(cfg, project)
        opened = OPENED
    finally:
        OPENED = None
    paths = pipeline.DataPaths(cfg.data.work_dir)
    return {"summary": summary, "opened": opened, "paths": paths,
            "quarantine": {kind: pipeline.read_jsonl(paths.jsonl(paths.quarantine, kind))
                           for kind in pipeline.KINDS},
            "validated": {kind: pipeline.read_jsonl(paths.jsonl(paths.validated, kind))
                          for kind in pipeline.KINDS}}


def rules_by_id(run: dict[str, Any], kind: str) -> dict[str, set[str]]:
    return {entry["id"]: {rule["rule"] for rule in entry["rules"]} for entry in run["quarantine"][kind]}


def test_nothing_outside_the_root_is_opened(run: dict[str, Any], corpus: dict[str, Path]) -> None:
    outside = corpus["outside"].resolve()
    opened = {Path(os.path.realpath(path)) for path in run["opened"]}
    assert not [path for path in opened if path.is_relative_to(outside)]
    # the hook was listening: the good images were opened through it
    assert {corpus["images"].resolve() / name for name in ("good.png", "good2.png")} <= opened


def test_every_bad_caption_is_quarantined_under_its_rule(run: dict[str, Any]) -> None:
    expected = {f"coco:{a}": rules for a, _, _, rules in COCO_ANNOTATIONS if rules}
    assert rules_by_id(run, "caption") == expected
    assert sorted(record["id"] for record in run["validated"]["caption"]) == ["coco:1", "coco:12"]


def test_every_bad_instruction_is_quarantined_under_its_rule(run: dict[str, Any]) -> None:
    expected = {f"alpaca:{i}": rules for i, (_, rules) in enumerate(ALPACA) if rules}
    expected |= {f"llava:{i}": rules for i, rules in enumerate(LLAVA_RULES) if rules}
    assert rules_by_id(run, "instruction") == expected
    assert sorted(r["id"] for r in run["validated"]["instruction"]) == ["alpaca:0", "alpaca:5", "llava:0",
                                                                        "llava:5"]


def test_input_is_validated_plus_quarantined(run: dict[str, Any]) -> None:
    summary = run["summary"]
    for kind, total in (("caption", len(COCO_ANNOTATIONS)), ("instruction", len(ALPACA) + len(LLAVA_RULES))):
        counts = summary[kind]
        assert counts["input"] == total
        assert counts["clean"] + counts["quarantined"] == total
        assert (counts["clean"], counts["quarantined"]) == (len(run["validated"][kind]),
                                                             len(run["quarantine"][kind]))


def test_escapes_are_reported_with_where_they_lead(run: dict[str, Any], corpus: dict[str, Path]) -> None:
    values = {f["id"]: f["value"] for f in run["summary"]["caption"]["failures"]
              if f["rule"] == "image inside its source root"}
    outside = str(corpus["outside"].resolve())
    assert set(values) == {"coco:2", "coco:3", "coco:4", "coco:15"}
    assert all(value.startswith("outside root: ") and outside in value for value in values.values())


def test_unlisted_unused_and_duplicate_records_are_listed_by_id(run: dict[str, Any]) -> None:
    captions, instructions = run["summary"]["caption"], run["summary"]["instruction"]
    assert captions["images_without_captions"] == {"count": 1, "ids": ["coco:7"]}
    assert captions["orphan_captions"] == {"count": 1, "ids": ["coco:10"]}
    assert captions["duplicates"] == {"count": 1, "ids": [{"id": "coco:11", "duplicate_of": "coco:1"}]}
    assert instructions["duplicates"] == {"count": 1, "ids": [{"id": "alpaca:4", "duplicate_of": "alpaca:0"}]}
    saved = json.loads((run["paths"].reports / "summary.json").read_text())
    assert saved["caption"]["images_without_captions"] == captions["images_without_captions"]
    pages = {suite: page_text(page) for suite, page in validation_pages(run["paths"].data_docs).items()}
    for text in ("images_without_captions 1: coco:7 ", "orphan_captions 1: coco:10 ",
                 "duplicates 1: coco:11 (duplicate of coco:1) "):
        assert text in pages["captions"]
    assert "duplicates 1: alpaca:4 (duplicate of alpaca:0) " in pages["instructions"]


def test_validation_metrics_count_what_the_report_lists(run: dict[str, Any]) -> None:
    metrics = json.loads(run["paths"].validation_metrics.read_text())
    listed = ("caption_images_without_captions", "caption_orphan_captions", "caption_duplicates")
    assert {key: metrics[key] for key in listed} == dict.fromkeys(listed, 1)
    assert metrics["caption_rule_image_inside_its_source_root"] == 4
    assert metrics["instruction_rule_text_free_of_control_characters"] == 3
    assert all(isinstance(value, int | float) for value in metrics.values())  # flat, as DVC shows it
