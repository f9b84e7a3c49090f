"""Property-based tests: random and mutated data files never crash a reader and never lose a record.

Every reader either returns one raw record per input item (annotation, array item, task instance)
or raises ``DataFormatError`` naming the file and a rule; validation then puts every record in
clean or quarantine (input = clean + quarantined). Files are random JSON, valid files with keys
deleted, values swapped for other JSON types, control characters, lone surrogates, huge strings,
and the bytes re-encoded (BOM, UTF-16, Latin-1) or flipped. The settings profile (tests/conftest.py)
makes CI runs derandomized; ``fuzz/readers_fuzz.py`` is the coverage-guided, long-running variant.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.schema import CaptionSource
from llama_adapter_v2.data import pipeline
from llama_adapter_v2.data.readers import (
    DataFormatError,
    RawRecord,
    read_alpaca,
    read_coco,
    read_llava,
    read_self_instruct,
)
from llama_adapter_v2.data.validation import TokenCounter

TOLERATED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=TOLERATED)
VALIDATE = settings(max_examples=8, deadline=None, suppress_health_check=TOLERATED)

# text with what breaks naive code: controls, NUL, lone surrogates, <image>, path escapes, RTL marks
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\x07\x7f", "\r\n", "\ud800", "<image>", "../../x.png", "/etc/passwd",
                     "\u202e", "a" * 5000, "<image>\n<image>"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30),
                    st.floats(allow_nan=False), odd_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn, item: dict[str, Any]) -> Any:
    """A valid item with keys deleted, retyped, or their text spiked; sometimes not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    result = dict(item)
    for key in list(result):
        action = draw(st.sampled_from(["keep", "keep", "delete", "retype", "spike"]))
        if action == "delete":
            del result[key]
        elif action == "retype":
            result[key] = draw(json_values)
        elif action == "spike" and isinstance(result[key], str):
            result[key] = result[key] + draw(odd_text)
    if draw(st.booleans()):
        result[draw(odd_text)] = draw(json_values)
    return result


def alpaca_item(i: int) -> dict[str, Any]:
    return {"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}."}


def llava_item(i: int) -> dict[str, Any]:
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": f"Thing {i}."}]
    return {"id": str(i), "image": f"{i}.png", "conversations": turns}


@st.composite
def alpaca_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    return [draw(mutated(alpaca_item(i))) for i in range(draw(st.integers(0, 6)))]


@st.composite
def llava_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    items = []
    for i in range(draw(st.integers(0, 5))):
        item = draw(mutated(llava_item(i)))
        if isinstance(item, dict) and isinstance(item.get("conversations"), list) and draw(st.booleans()):
            turns = item["conversations"]
            item["conversations"] = [draw(mutated(t)) if isinstance(t, dict) else t for t in turns]
        items.append(item)
    return items


@st.composite
def coco_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(draw(st.integers(0, 4)))]
    if draw(st.integers(0, 3)) == 0:
        images = [draw(mutated(image)) for image in images]
    annotations = [draw(mutated({"id": a, "image_id": draw(st.integers(0, 5)), "caption": f"Caption {a}."}))
                   for a in range(draw(st.integers(0, 6)))]
    document: dict[str, Any] = {"images": images, "annotations": annotations}
    return draw(mutated(document)) if draw(st.integers(0, 5)) == 0 else document


@st.composite
def self_instruct_documents(draw: st.DrawFn) -> list[Any]:
    tasks = []
    for t in range(draw(st.integers(0, 4))):
        count = draw(st.integers(0, 3))
        instances = [draw(mutated({"input": "", "output": f"Out {t}.{k}."})) for k in range(count)]
        tasks.append(draw(mutated({"id": f"t{t}", "instruction": f"Do {t}.", "instances": instances})))
    return tasks


@st.composite
def encoded(draw: st.DrawFn, text: str) -> bytes:
    """The text as a file: UTF-8 (most often), with a BOM, UTF-16, Latin-1, or with a byte flipped."""
    how = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "bom", "utf-16", "latin-1", "flip", "truncate"]))
    data = text.encode("utf-8", "surrogatepass")
    if how == "bom":
        return codecs.BOM_UTF8 + data
    if how in ("utf-16", "latin-1"):
        return text.encode(how, "replace")
    if how == "flip" and data:
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


def write_document(folder: Path, name: str, document: Any, data: bytes | None) -> Path:
    path = folder / name
    path.write_bytes(data if data is not None else json.dumps(document).encode())
    return path


def read_or_refuse(path: Path, read: Any) -> list[RawRecord] | None:
    """The reader's records, or None after checking the refusal names the file and a rule."""
    try:
        return read(path)
    except DataFormatError as err:
        assert err.file == str(path) and err.rule and str(path) in str(err)
        return None


def items_in(document: Any) -> int:
    return len(document) if isinstance(document, list) else -1


@FUZZ
@given(document=alpaca_documents(), data=st.data())
def test_alpaca_reader_keeps_every_item_or_names_the_refusal(tmp_path: Path, document: Any,
                                                             data: Any) -> None:
    text = json.dumps(document)
    raw_bytes = data.draw(encoded(text))
    path = write_document(tmp_path, "a.json", document, raw_bytes)
    records = read_or_refuse(path, lambda p: read_alpaca(p, "a"))
    if records is not None and raw_bytes.removeprefix(codecs.BOM_UTF8) == text.encode():
        assert len(records) == items_in(document)


@FUZZ
@given(document=llava_documents(), data=st.data())
def test_llava_reader_keeps_every_item_or_names_the_refusal(tmp_path: Path, document: Any, data: Any) -> None:
    text = json.dumps(document)
    raw_bytes = data.draw(encoded(text))
    path = write_document(tmp_path, "c.json", document, raw_bytes)
    records = read_or_refuse(path, lambda p: read_llava(p, "c", tmp_path / "images"))
    if records is not None and raw_bytes.removeprefix(codecs.BOM_UTF8) == text.encode():
        assert len(records) == items_in(document)
        assert all(r.image_root == str(tmp_path / "images") for r in records)


@FUZZ
@given(document=coco_documents(), data=st.data())
def test_coco_reader_keeps_every_annotation_or_names_the_refusal(tmp_path: Path, document: Any,
                                                                 data: Any) -> None:
    text = json.dumps(document)
    raw_bytes = data.draw(encoded(text))
    path = write_document(tmp_path, "coco.json", document, raw_bytes)
    source = CaptionSource(name="c", annotations=path, images=tmp_path / "images")
    records = read_or_refuse(path, lambda _: read_coco(source))
    if records is not None and raw_bytes.removeprefix(codecs.BOM_UTF8) == text.encode():
        assert len(records) == len(document["annotations"])


@FUZZ
@given(document=self_instruct_documents())
def test_self_instruct_reader_keeps_every_instance_or_names_the_refusal(tmp_path: Path,
                                                                       document: list[Any]) -> None:
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(task) + "\n" for task in document), encoding="utf-8")
    records = read_or_refuse(path, lambda p: read_self_instruct(p, "s"))
    assert records is not None  # every line is valid JSON: no refusal, only problems on records
    expected = sum(len(t["instances"]) if isinstance(t, dict) and isinstance(t.get("instances"), list)
                   and t["instances"] else 1 for t in document)
    assert len(records) == expected


@pytest.mark.parametrize("depth", [50, 100_000])
def test_deep_nesting_is_a_named_refusal_or_read(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * depth + "]" * depth)
    records = read_or_refuse(path, lambda p: read_alpaca(p, "a"))
    assert (records is None) == (depth > 1000)
    if records is not None:
        assert len(records) == 1 and records[0].problems[0] == "a record must be an object, found array"


def test_a_number_longer_than_python_converts_is_a_named_refusal(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('[{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}]")
    with pytest.raises(DataFormatError, match=r"big\.json: JSON number size"):
        read_alpaca(path, "a")


# --------------------------------------------------------------------------- the validator


@pytest.fixture(scope="module")
def fuzz_config(demo_data_config: Config) -> Config:
    cfg = demo_data_config.model_copy(deep=True)
    cfg.data.validation.max_failure_fraction = 1.0
    return cfg


@VALIDATE
@given(alpaca=alpaca_documents(), llava=llava_documents())
def test_validation_puts_every_instruction_in_clean_or_quarantine(tmp_path_factory: pytest.TempPathFactory,
                                                                  fuzz_config: Config, alpaca: Any,
                                                                  llava: Any) -> None:
    folder = tmp_path_factory.mktemp("fuzz-instructions")
    (folder / "images").mkdir()
    raws = read_or_refuse(write_document(folder, "a.json", alpaca, None), lambda p: read_alpaca(p, "a")) or []
    raws += read_or_refuse(write_document(folder, "c.json", llava, None),
                           lambda p: read_llava(p, "c", folder / "images")) or []
    assume(raws)
    outcome = pipeline.validate_kind("instruction", raws, fuzz_config, TokenCounter(None))
    assert_every_record_accounted(raws, outcome)


@VALIDATE
@given(document=coco_documents())
def test_validation_puts_every_caption_in_clean_or_quarantine(tmp_path_factory: pytest.TempPathFactory,
                                                              fuzz_config: Config, document: Any) -> None:
    folder = tmp_path_factory.mktemp("fuzz-coco")
    (folder / "images").mkdir()
    for i in range(3):  # some listed images exist, are real PNGs (the demo's first)
        (folder / "images" / f"{i}.png").write_bytes(next(fuzz_config.data.captions[0].images.glob("*.png"))
                                                     .read_bytes())
    path = write_document(folder, "coco.json", document, None)
    raws = read_or_refuse(path, lambda p: read_coco(CaptionSource(name="c", annotations=p,
                                                                  images=folder / "images"))) or []
    assume(raws)
    outcome = pipeline.validate_kind("caption", raws, fuzz_config, TokenCounter(None))
    assert_every_record_accounted(raws, outcome)


def assert_every_record_accounted(raws: list[RawRecord], outcome: dict[str, Any]) -> None:
    clean = [record.id for record in outcome["clean"]]
    quarantined = [entry["id"] for entry in outcome["quarantine"]]
    assert len(clean) + len(quarantined) == len(raws)
    assert all(entry["rules"] for entry in outcome["quarantine"])  # each quarantined record names its rules
    assert sorted(clean + quarantined) == sorted(raw.id for raw in raws)
