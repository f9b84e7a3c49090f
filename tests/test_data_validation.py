"""great-expectations validation: each bad input is quarantined under its rule, the rest go on.

Each bad caption set is validated once (one GX run per module fixture); the tests then check
one bad input each. GX imports once per process (gx_context is cached).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from data_docs import page_text, validation_pages
from PIL import Image

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.schema import CaptionSource, InstructionSource, ValidationConfig
from llama_adapter_v2.data import pipeline
from llama_adapter_v2.data.formatting import encode_record
from llama_adapter_v2.data.readers import read_alpaca, read_coco, read_llava, read_self_instruct
from llama_adapter_v2.data.validation import (
    IMAGE_OK,
    IMAGE_RULES,
    SUITES,
    TokenCounter,
    ValidationStoppedError,
    check_image,
    failures_of,
    inspect_image,
    run_suite,
)

LIMITS = ValidationConfig(caption_max_chars=1000, image_min_side=8, max_tokens=300)
PARAMETERS = {"image_min_side": 8, "image_max_side": 8192, "caption_min_chars": 1, "caption_max_chars": 1000,
              "max_tokens": 300}
# an instruction row that breaks no rule
EMPTY_INSTRUCTION_ROW = {"row": 0, "id": "x:0", "structure": None, "instruction": "Do.",
                         "shortest_output": "Done.", "valid_utf8": True, "control_characters": None,
                         "tokens": 5, "duplicate_of": None, "image_status": "ok", "image_detail": None}


def png_bytes(mode: str, size: tuple[int, int] = (32, 24), colour: Any = None) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(mode: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else None).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (IHDR, CRC recomputed) claims width x height."""
    data = bytearray(png_bytes("RGB", (1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


IMAGES = {
    "good.png": png_bytes("RGB"),
    "truncated.jpg": jpeg_bytes("RGB", (64, 64))[:300],
    "text.jpg": b"this is a text file, not a JPEG\n",
    "empty.jpg": b"",
    "bomb.png": bomb_png(30000, 30000),
    "cmyk.jpg": jpeg_bytes("CMYK"),
    "palette.png": png_bytes("P", colour=3),
    "rgba.png": png_bytes("RGBA", colour=(10, 20, 30, 0)),
    "gray.jpg": jpeg_bytes("L"),
    "tiny.png": png_bytes("RGB", (4, 4)),
}
# image name -> caption id using it; "missing.jpg" is listed but absent, image 99 is not listed.
CAPTIONS: list[tuple[int, Any, Any]] = [(i + 1, i + 1, f"A picture number {i}.") for i in range(len(IMAGES))]
CAPTIONS += [
    (101, 1, None), (102, 1, "   \n"), (103, 1, "a" * 10_000),
    (104, 1, "First of two with one id."), (104, 1, "Second of two with one id."),
    (105, 99, "Points at no image."), (106, 11, "Listed image file is absent."),
]


@pytest.fixture(scope="module")
def caption_outcome(tmp_path_factory: pytest.TempPathFactory, demo_data_config: Config) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad-coco")
    (root / "images").mkdir()
    for name, content in IMAGES.items():
        (root / "images" / name).write_bytes(content)
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(IMAGES)]
    images.append({"id": 11, "file_name": "missing.jpg"})
    annotations = [{"id": a, "image_id": im, "caption": c} for a, im, c in CAPTIONS]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    raws = read_coco(CaptionSource(name="bad", annotations=root / "captions.json", images=root / "images"))
    cfg = demo_data_config.model_copy(deep=True)
    cfg.data.validation = LIMITS
    outcome = pipeline.validate_kind("caption", raws, cfg, TokenCounter(None))
    rules: dict[str, set[str]] = {}
    for failure in outcome["failures"]:
        rules.setdefault(f"{failure['id']}#{failure['row']}", set()).add(failure["rule"])
    return {"raws": raws, "outcome": outcome, "rules": rules}


def rules_of(outcome: dict[str, Any], annotation_id: int) -> set[str]:
    return set().union(*(r for key, r in outcome["rules"].items() if key.startswith(f"bad:{annotation_id}#")))


def image_rule(outcome: dict[str, Any], name: str) -> set[str]:
    return rules_of(outcome, list(IMAGES).index(name) + 1)


MISSING = "image file exists"


def test_truncated_jpeg_is_quarantined(caption_outcome: dict[str, Any], tmp_path: Path) -> None:
    assert image_rule(caption_outcome, "truncated.jpg") == {"image file complete"}
    (tmp_path / "t.jpg").write_bytes(IMAGES["truncated.jpg"])
    check = inspect_image(tmp_path / "t.jpg", 10**8)
    assert (check.status, check.detail) == ("truncated", "Truncated File Read")


def test_text_file_named_jpg_is_not_an_image(caption_outcome: dict[str, Any], tmp_path: Path) -> None:
    assert image_rule(caption_outcome, "text.jpg") == {"image file is an image"}
    (tmp_path / "t.jpg").write_bytes(IMAGES["text.jpg"])
    assert inspect_image(tmp_path / "t.jpg", 10**8).status == "not an image"


def test_zero_byte_file_is_empty(caption_outcome: dict[str, Any], tmp_path: Path) -> None:
    assert image_rule(caption_outcome, "empty.jpg") == {"image file not empty"}
    (tmp_path / "e.jpg").write_bytes(b"")
    assert inspect_image(tmp_path / "e.jpg", 10**8).status == "empty file"


def test_decompression_bomb_header_is_refused_before_decoding(caption_outcome: dict[str, Any],
                                                              tmp_path: Path) -> None:
    assert image_rule(caption_outcome, "bomb.png") == {"image within the pixel limit"}
    (tmp_path / "b.png").write_bytes(IMAGES["bomb.png"])
    assert inspect_image(tmp_path / "b.png", 40_000_000).status == "over pixel limit"
    small_bomb = tmp_path / "s.png"
    small_bomb.write_bytes(bomb_png(8000, 6000))  # under PIL's own limit, over the configured one
    check = inspect_image(small_bomb, 40_000_000)
    assert (check.status, check.detail) == (
        "over pixel limit", "header says 8000x6000, above data.validation.max_image_pixels=40000000")


@pytest.mark.parametrize("name, mode", [("cmyk.jpg", "CMYK"), ("palette.png", "P"), ("rgba.png", "RGBA"),
                                        ("gray.jpg", "L")])
def test_non_rgb_modes_are_converted_not_rejected(caption_outcome: dict[str, Any], tmp_path: Path,
                                                 name: str, mode: str) -> None:
    assert image_rule(caption_outcome, name) == set()
    (tmp_path / name).write_bytes(IMAGES[name])
    check = inspect_image(tmp_path / name, 10**8)
    assert (check.status, check.mode) == ("ok", mode)
    clean_ids = {r.id for r in caption_outcome["outcome"]["clean"]}
    assert f"bad:{list(IMAGES).index(name) + 1}" in clean_ids


def test_image_below_the_minimum_side_is_out_of_bounds(caption_outcome: dict[str, Any]) -> None:
    expected = {"image width within bounds", "image height within bounds"}
    assert image_rule(caption_outcome, "tiny.png") == expected


def test_missing_image_file_is_reported_as_missing(caption_outcome: dict[str, Any]) -> None:
    assert rules_of(caption_outcome, 106) == {MISSING}
    values = [f["value"] for f in caption_outcome["outcome"]["failures"] if f["id"] == "bad:106"]
    assert values == ["missing file"]


def test_null_caption(caption_outcome: dict[str, Any]) -> None:
    assert rules_of(caption_outcome, 101) == {"caption not null"}


def test_blank_caption(caption_outcome: dict[str, Any]) -> None:
    assert rules_of(caption_outcome, 102) == {"caption not blank"}


def test_ten_thousand_character_caption(caption_outcome: dict[str, Any]) -> None:
    assert rules_of(caption_outcome, 103) == {"caption length within bounds"}


def test_duplicate_annotation_ids_quarantine_both(caption_outcome: dict[str, Any]) -> None:
    assert caption_outcome["rules"].keys() >= {"bad:104#13", "bad:104#14"}
    assert rules_of(caption_outcome, 104) == {"unique annotation id"}


def test_annotation_pointing_at_no_image(caption_outcome: dict[str, Any]) -> None:
    assert rules_of(caption_outcome, 105) == {"annotation points at a listed image"}


def test_clean_plus_quarantined_is_the_input(caption_outcome: dict[str, Any]) -> None:
    outcome = caption_outcome["outcome"]
    assert len(caption_outcome["raws"]) == len(CAPTIONS) == 17
    assert len(outcome["clean"]) == 5  # good, cmyk, palette, rgba, gray
    assert len(outcome["clean"]) + len(outcome["quarantine"]) == 17
    assert {q["id"] for q in outcome["quarantine"]}.isdisjoint({r.id for r in outcome["clean"]})


# --------------------------------------------------------------------------- instructions


def test_instruction_rules(tmp_path: Path, demo_data_config: Config) -> None:
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Say nothing.", "input": "", "output": ""},
        {"instruction": "Say a space.", "input": "No input", "output": "  "},
        {"instruction": "   ", "input": "", "output": "x"},
        {"instruction": "No output key."},
        {"instruction": "Too long.", "input": "", "output": "word " * 60},
        {"instruction": "Broken text \ud800.", "input": "", "output": "y"},
        {"instruction": "Fine.", "input": "<noinput>", "output": "Yes."},
    ]
    alpaca_path = tmp_path / "alpaca.json"
    alpaca_path.write_text(json.dumps(records))  # ensure_ascii keeps the lone surrogate as \ud800
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    chats = [{"id": "c1", "image": "absent.jpg", "conversations": turns}]
    chat_path = tmp_path / "chat.json"
    chat_path.write_text(json.dumps(chats))
    raws = read_alpaca(alpaca_path, "a") + read_llava(chat_path, "c", tmp_path)
    cfg = demo_data_config.model_copy(deep=True)
    cfg.data.validation = LIMITS
    outcome = pipeline.validate_kind("instruction", raws, cfg, TokenCounter(None))
    found: dict[str, set[str]] = {}
    for failure in outcome["failures"]:
        found.setdefault(failure["id"], set()).add(failure["rule"])
    assert found == {
        "a:1": {"not an exact duplicate"},
        "a:2": {"output not empty"},
        "a:3": {"output not empty"},
        "a:4": {"instruction not blank"},
        "a:5": {"required fields present"},
        "a:6": {"token length within limit"},
        "a:7": {"valid UTF-8"},
        "c:0": {MISSING},
    }
    assert [r.id for r in outcome["clean"]] == ["a:0", "a:8"]
    assert [f["value"] for f in outcome["failures"] if f["id"] == "c:0"] == ["missing file"]
    assert [f["value"] for f in outcome["failures"] if f["id"] == "a:1"] == ["a:0"]


def test_token_counter_uses_the_configured_tokenizer(demo_tokenizer, tmp_path: Path) -> None:
    demo_tokenizer.save_pretrained(tmp_path)
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "What is 2 plus 3?", "input": "", "output": "5"}]))
    raw = read_alpaca(path, "a")[0]

    assert TokenCounter(tmp_path).count(raw) == len(encode_record(raw.to_record(), demo_tokenizer, 10**6)[0])
    by_bytes = TokenCounter(None).count(raw)
    assert by_bytes is not None and by_bytes > TokenCounter(tmp_path).count(raw)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        TokenCounter(tmp_path / "nothing")


# --------------------------------------------------------------------------- the stage


def stage_config(base: Config, root: Path, records: list[dict[str, Any]]) -> Config:
    cfg = base.model_copy(deep=True)
    (root / "alpaca.json").write_text(json.dumps(records))
    cfg.data.captions = []
    cfg.data.instructions = [InstructionSource(name="a", format="alpaca", path=root / "alpaca.json")]
    cfg.data.work_dir = root / "work"
    return cfg


GOOD = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(19)]


def test_stage_writes_clean_quarantine_reports_and_data_docs(demo_data_config: Config,
                                                             tmp_path: Path) -> None:
    cfg = stage_config(demo_data_config, tmp_path, [*GOOD, {"instruction": "Empty.", "output": ""}])
    cfg.data.validation.max_failure_fraction = 0.1
    cfg.data.validation.max_tokens = 777
    pipeline.prepare(cfg, tmp_path)
    summary = pipeline.validate(cfg, tmp_path, data_version="0123456789abcdef")
    paths = pipeline.DataPaths(cfg.data.work_dir)
    assert summary["instruction"]["input"] == 20
    assert (summary["instruction"]["clean"], summary["instruction"]["quarantined"]) == (19, 1)
    assert summary["instruction"]["failures"] == [{"id": "a:19", "rule": "output not empty", "value": ""}]
    assert len(pipeline.read_jsonl(paths.jsonl(paths.validated, "instruction"))) == 19
    quarantined = pipeline.read_jsonl(paths.jsonl(paths.quarantine, "instruction"))
    assert [(q["id"], q["rules"][0]["rule"]) for q in quarantined] == [("a:19", "output not empty")]
    metrics = json.loads(paths.validation_metrics.read_text())
    assert {name: value for name, value in metrics.items() if name.startswith("instruction_")} == {
        "instruction_input": 20, "instruction_clean": 19, "instruction_quarantined": 1,
        "instruction_failure_fraction": 0.05, "instruction_duplicates": 0,
        "instruction_rule_output_not_empty": 1}

    # great-expectations' Data Docs: every expectation with its limits, the failing id, the data
    docs = paths.data_docs
    assert summary["data_docs"] == "work/reports/data_docs/index.html"
    pages = validation_pages(docs)
    assert set(pages) == {"instructions"}  # no caption source: no caption suite ran
    text = page_text(pages["instructions"])
    suite = json.loads((SUITES / "instructions.json").read_text())
    assert f"Evaluated Expectations {len(suite['expectations'])} " in text
    assert "Unsuccessful Expectations 1 " in text
    assert "less than or equal to 777.0" in text  # the limit as data.validation set it
    # the failing record: its expectation, the unexpected count and its id (GX's unexpected index table)
    assert re.search(r"match this regular expression: \\S \. 1 unexpected values found\. "
                     r"5% of 20 total rows\. Unexpected Value Count row id EMPTY 1 19 a:19 ", text), text
    assert "data_dvc_md5 0123456789abcdef " in text
    assert f"prepared_sha256 {summary['instruction']['prepared_sha256']} " in text
    assert f"validated_at {summary['validated_at']} " in text
    assert "records 20 in, 19 clean, 1 quarantined" in text
    rules = page_text(docs / "expectations" / "instructions.html")
    assert all(f"rule: {e['meta']['rule']}" in rules for e in suite["expectations"])


def test_stage_stops_above_the_failure_fraction(demo_data_config: Config, tmp_path: Path) -> None:
    cfg = stage_config(demo_data_config, tmp_path, [*GOOD[:8], *({"instruction": "x"} for _ in range(2))])
    cfg.data.validation.max_failure_fraction = 0.1
    pipeline.prepare(cfg, tmp_path)
    expected = (r"instruction validation stopped: 2 of 10 records failed \(20\.00%, above "
                r"max_failure_fraction 10\.00%\); clean 8, quarantined 2 .*"
                r"Data Docs: work/reports/data_docs/index\.html")
    with pytest.raises(ValidationStoppedError, match=expected):
        pipeline.validate(cfg, tmp_path)
    assert (tmp_path / "work/reports/summary.json").is_file()
    assert (tmp_path / "work/reports/data_docs/index.html").is_file()


def test_on_failure_stop_stops_at_the_first_failure(demo_data_config: Config, tmp_path: Path) -> None:
    cfg = stage_config(demo_data_config, tmp_path, [*GOOD, {"instruction": "x", "output": " "}])
    cfg.data.validation.on_failure = "stop"
    pipeline.prepare(cfg, tmp_path)
    expected = r"1 of 20 records failed \(5\.00%, on_failure is 'stop'\)"
    with pytest.raises(ValidationStoppedError, match=expected):
        pipeline.validate(cfg, tmp_path)


# --------------------------------------------------------------------------- the real-data kit


def test_real_data_validation_counts(real_data: Path, demo_data_config: Config) -> None:
    folder = real_data / "instructions"
    annotations = real_data / "coco/annotations/captions_sample.json"
    coco = read_coco(CaptionSource(name="coco", annotations=annotations, images=real_data / "coco/images"))
    instructions = (read_alpaca(folder / "alpaca_5000.json", "alpaca5k")
                    + read_alpaca(folder / "alpaca_zh_demo_first200.json", "zh")
                    + read_alpaca(folder / "alpaca_en_demo_first200.json", "en")
                    + read_self_instruct(folder / "seed_tasks.jsonl", "seed")
                    + read_llava(folder / "llava_instruct_first20.json", "llava", real_data / "coco/images"))
    cfg = demo_data_config.model_copy(deep=True)
    cfg.data.validation = ValidationConfig(max_tokens=100_000)  # the token rule is pinned elsewhere

    captions = pipeline.validate_kind("caption", coco, cfg, TokenCounter(None))
    assert (len(captions["clean"]), len(captions["quarantine"])) == (100, 0)
    gray = [r for r in captions["clean"] if r.image.endswith("000000431848.jpg")]
    assert len(gray) == 5 and inspect_image(gray[0].image, 10**8).mode == "L"

    outcome = pipeline.validate_kind("instruction", instructions, cfg, TokenCounter(None))
    assert len(instructions) == 5000 + 200 + 200 + 175 + 20
    assert len(outcome["clean"]) + len(outcome["quarantine"]) == len(instructions)
    found = sorted((f["id"], f["rule"], f["value"]) for f in outcome["failures"]
                   if not f["id"].startswith("llava"))
    assert found == [
        ("alpaca5k:2335", "output not empty", ""),
        ("alpaca5k:4658", "output not empty", ""),
        ("en:169", "not an exact duplicate", "alpaca5k:2461"),  # the same record is in both files
    ]
    absent = [(f["rule"], f["value"]) for f in outcome["failures"] if f["id"].startswith("llava")]
    assert absent == [(MISSING, "missing file")] * 20
    assert len(outcome["clean"]) == 5595 - 23


# --------------------------------------------------------------------------- image rules


@pytest.mark.parametrize("suite", ["captions", "instructions"])
def test_every_image_status_has_its_rule_in_the_suite(suite: str) -> None:
    expectations = json.loads((SUITES / f"{suite}.json").read_text())["expectations"]
    on_status = {tuple(e["kwargs"]["value_set"]): e["meta"]["rule"] for e in expectations
                 if e["kwargs"]["column"] == "image_status" and e["type"].endswith("not_be_in_set")}
    assert on_status == {(status,): rule for status, rule in IMAGE_RULES.items()}
    in_set = "expect_column_values_to_be_in_set"
    [known] = [e for e in expectations if e["kwargs"]["column"] == "image_status" and e["type"] == in_set]
    assert set(known["kwargs"]["value_set"]) == {IMAGE_OK, *IMAGE_RULES}


def test_an_image_status_no_rule_names_is_still_quarantined() -> None:
    rows = [{**EMPTY_INSTRUCTION_ROW, "image_status": "a status added without a rule"}]
    failures = failures_of(run_suite("instructions", rows, PARAMETERS), rows)
    assert [(f["id"], f["rule"]) for f in failures] == [("x:0", "image status known")]


def test_an_image_without_a_usable_root_counts_as_outside(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes("RGB"))
    assert check_image(str(tmp_path / "a.png"), str(tmp_path), 10**8).status == IMAGE_OK
    for root in (None, "bad\x00root"):
        check = check_image(str(tmp_path / "a.png"), root, 10**8)
        assert check is not None and check.status == "outside root"
    assert check_image("a\x00.png", str(tmp_path), 10**8) is None  # the control-character rule names it
