"""Readers: every format into one Record type; unreadable files fail naming file, position and rule."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.config.schema import CaptionSource
from llama_adapter_v2.data.formatting import is_placeholder_input
from llama_adapter_v2.data.readers import (
    DataFormatError,
    load_json,
    read_alpaca,
    read_coco,
    read_coco_listing,
    read_llava,
    read_self_instruct,
)

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Reverse.", "input": "a b", "output": "b a"}]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.json", '[\n  {"instruction": "a",\n   "output": }\n]')
    expected = r"broken\.json: JSON syntax: Expecting value at line 3, column 14"
    with pytest.raises(DataFormatError, match=expected):
        read_alpaca(path, "broken")


def test_wrong_top_level_type_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "object.json", json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(DataFormatError, match=r"object\.json: top-level type: an Alpaca file must be a JSON "
                                              r"array, found object"):
        read_alpaca(path, "x")
    coco = write(tmp_path / "coco.json", "[]")
    with pytest.raises(DataFormatError, match="COCO caption file must be a JSON object, found array"):
        read_coco(CaptionSource(name="c", annotations=coco, images=tmp_path))


def test_coco_without_annotations_key_is_refused(tmp_path: Path) -> None:
    coco = write(tmp_path / "coco.json", json.dumps({"images": []}))
    with pytest.raises(DataFormatError, match="required keys: missing top-level key 'annotations'"):
        read_coco(CaptionSource(name="c", annotations=coco, images=tmp_path))


def test_record_with_missing_keys_is_kept_for_quarantine_and_refused_as_record(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", json.dumps([ALPACA[0], {"instruction": "no output here"}]))
    good, bad = read_alpaca(path, "a")
    assert good.problems == [] and good.to_record().response == "5"
    assert bad.problems == ["missing key 'output'"]
    with pytest.raises(DataFormatError, match=r"a\.json: record a:1: record structure: missing key 'output'"):
        bad.to_record()


def test_invalid_utf8_names_the_byte_and_position(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.json", b'[\n{"instruction": "Ol\xe9", "output": "x"}]')
    with pytest.raises(DataFormatError, match=r"latin1\.json: valid UTF-8: byte 0xe9 at line 2, column 20"):
        read_alpaca(path, "x")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.json", json.dumps(ALPACA))
    with_bom = write(tmp_path / "bom.json", codecs.BOM_UTF8 + json.dumps(ALPACA).encode())
    assert load_json(with_bom) == load_json(plain) == ALPACA
    assert [r.to_record().turns for r in read_alpaca(with_bom, "x")] == [
        r.to_record().turns for r in read_alpaca(plain, "x")]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"nope\.json: file exists: no such file"):
        read_alpaca(tmp_path / "nope.json", "x")


def test_jsonl_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "seed.jsonl", '{"id": "t1", "instruction": "a", "instances": []}\n{"id": oops}\n')
    with pytest.raises(DataFormatError, match=r"JSON syntax: Expecting value at line 2, column 8"):
        read_self_instruct(path, "seed")


def test_llava_image_token_at_start_or_end_is_removed_and_every_turn_kept(tmp_path: Path) -> None:
    chats = [
        {"id": "1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "2", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A dog."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "4", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                      {"from": "gpt", "value": "?"}]},
    ]
    first, second, text_only, tokenless = read_llava(write(tmp_path / "chat.json", json.dumps(chats)), "c",
                                                     tmp_path / "images")
    assert [t.text for t in first.to_record().turns] == ["What is it?", "A cat.", "Colour?", "Black."]
    assert [t.role for t in first.to_record().turns] == ["user", "assistant", "user", "assistant"]
    assert first.image == str(tmp_path / "images" / "a.jpg")
    assert second.to_record().instruction == "What is it?"
    assert text_only.image is None
    # one exchange is an instruction (Alpaca template, as inference asks a first question); more: a chat
    assert text_only.to_record().template == second.to_record().template == "alpaca"
    assert first.to_record().template == "chat"
    assert tokenless.problems == ["'<image>' in the first turn but no 'image' key"]


def test_real_coco_sample(real_data: Path) -> None:
    source = CaptionSource(name="coco", annotations=real_data / "coco/annotations/captions_sample.json",
                           images=real_data / "coco/images")
    raws = read_coco(source)
    records = [r.to_record() for r in raws]
    assert len(records) == 100
    assert len({r.image for r in records}) == 20
    assert all(Path(r.image).is_file() for r in records)
    assert {r.instruction for r in records} == {"Generate caption of this image"}
    assert sum(r.response.endswith("\n") for r in records) == 1


def test_real_instruction_files(real_data: Path) -> None:
    folder = real_data / "instructions"
    alpaca = [r.to_record() for r in read_alpaca(folder / "alpaca_5000.json", "alpaca")]
    assert len(alpaca) == 5000
    assert sum(r.response == "" for r in alpaca) == 2
    assert sum(r.input == "" for r in alpaca) == 3057
    # "No input" 18, "Noinput" 10, "No input." 4, "<No input>" 4, ... "(No input)", "[noinput]", "N/A", "None"
    assert sum(r.input != "" and is_placeholder_input(r.input) for r in alpaca) == 59
    assert not is_placeholder_input(next(r.input for r in alpaca if r.input.startswith("\\--")))
    zh = [r.to_record() for r in read_alpaca(folder / "alpaca_zh_demo_first200.json", "zh")]
    assert len(zh) == 200 and sum(r.input == "" for r in zh) == 170
    assert all(any(ord(ch) > 127 for ch in r.instruction + r.response) for r in zh)
    en = read_alpaca(folder / "alpaca_en_demo_first200.json", "en")
    assert len(en) == 200 and sum(r.input == "" for r in en) == 125
    seeds = [r.to_record() for r in read_self_instruct(folder / "seed_tasks.jsonl", "seed")]
    assert len(seeds) == 175 and sum(r.input == "" for r in seeds) == 50
    assert seeds[0].id == "seed:seed_task_0"
    chats = [r.to_record() for r in read_llava(folder / "llava_instruct_first20.json", "llava", None)]
    assert len(chats) == 20
    roles = [t.role for c in chats for t in c.turns]
    assert roles.count("user") == roles.count("assistant") == 91
    assert not any("<image>" in t.text for c in chats for t in c.turns)
    assert all(c.image and c.image.endswith(".jpg") for c in chats)


def test_cli_prepare_exits_naming_the_broken_file(tmp_path: Path, repo_root: Path) -> None:
    broken = write(tmp_path / "broken.json", '[{"instruction": "a",}]')
    result = CliRunner().invoke(app, [
        "data", "prepare", str(repo_root / "configs/demo.yaml"),
        "--set", f"data.instructions=[{{name: b, format: alpaca, path: '{broken}'}}]",
        "--set", "data.captions=[]", "--set", f"data.work_dir='{tmp_path / 'work'}'",
    ])
    assert result.exit_code == 2
    message = "Expecting property name enclosed in double quotes"
    assert f"{broken}: JSON syntax: {message} at line 1, column 22" in result.output
    assert not (tmp_path / "work").exists()


def test_coco_image_entry_with_an_unusable_id_stops_the_file_naming_it(tmp_path: Path) -> None:
    coco = write(tmp_path / "coco.json", json.dumps({"images": [{"id": 1, "file_name": "a.png"},
                                                                {"id": [2], "file_name": "b.png"}],
                                                     "annotations": []}))
    expected = (r"coco\.json: record images\[1\]: image entry types: 'id' must be a number or string "
                r"and 'file_name' a string, found array and string")
    with pytest.raises(DataFormatError, match=expected):
        read_coco(CaptionSource(name="c", annotations=coco, images=tmp_path))


def test_coco_listing_names_the_images_no_caption_uses(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    annotations = [{"id": 10, "image_id": 2, "caption": "x"}, {"id": 11, "image_id": [2], "caption": "y"}]
    coco = write(tmp_path / "coco.json", json.dumps({"images": images, "annotations": annotations}))
    listing = read_coco_listing(CaptionSource(name="c", annotations=coco, images=tmp_path / "img"))
    assert listing.images_without_captions == [1, 3]
    unusable = "'image_id' must be a number or string, found array"
    assert [r.problems for r in listing.records] == [[], [unusable]]
    assert {r.image_root for r in listing.records} == {str(tmp_path / "img")}


def test_llava_images_without_an_image_root_live_beside_the_file(tmp_path: Path) -> None:
    chats = [{"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "A cat."}]}]
    [raw] = read_llava(write(tmp_path / "chat.json", json.dumps(chats)), "c", None)
    assert (raw.image, raw.image_root) == (str(tmp_path / "a.jpg"), str(tmp_path))
