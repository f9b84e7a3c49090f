"""The demo generator: byte-identical output, the sizes asked for, captions that match the drawing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from llama_adapter_v2.data.demo import (
    BACKGROUNDS,
    COLOURS,
    PLACES,
    RESTATE_EVERY,
    generate_demo,
    reading_tasks,
)
from llama_adapter_v2.data.shards import split_of
from llama_adapter_v2.evaluate.grounded import named_values


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_are_byte_identical(demo_data_config, tmp_path: Path) -> None:
    first_root = Path(demo_data_config.data.captions[0].annotations).parents[4]
    data = demo_data_config.data.model_copy(deep=True)
    data.captions[0].annotations = tmp_path / "data/demo/coco/annotations/captions.json"
    data.captions[0].images = tmp_path / "data/demo/coco/images"
    for source in data.instructions:
        source.path = tmp_path / "data/demo/instructions" / Path(source.path).name
    data.grounded.questions = tmp_path / "data/demo/grounded/questions.json"
    data.grounded.images = tmp_path / "data/demo/grounded/images"
    generate_demo(data)
    first, second = tree_digest(first_root / "data"), tree_digest(tmp_path / "data")
    assert len(first) == 240 + 3 + 100 + 1  # images, three JSON files, probe images, questions
    assert first == second


def test_sizes_follow_the_config(demo_data_config) -> None:
    data = demo_data_config.data
    coco = json.loads(Path(data.captions[0].annotations).read_text())
    assert len(coco["images"]) == 240
    assert len(coco["annotations"]) == 240 * 5
    per_image = {im["id"]: 0 for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
    assert set(per_image.values()) == {5}
    alpaca = json.loads(Path(data.instructions[0].path).read_text())
    chats = json.loads(Path(data.instructions[1].path).read_text())
    assert len(alpaca) == 1200
    assert len({json.dumps(t, sort_keys=True) for t in alpaca}) == 1200
    assert len(chats) == 480
    with_image = [c for c in chats if "image" in c]
    assert len(with_image) == 240
    firsts = [c["conversations"][0]["value"] for c in with_image]
    assert any(v.startswith("<image>") for v in firsts) and any(v.endswith("<image>") for v in firsts)


def test_captions_describe_the_drawing(demo_data_config) -> None:
    data = demo_data_config.data
    coco = json.loads(Path(data.captions[0].annotations).read_text())
    first_caption = {a["image_id"]: a["caption"] for a in reversed(coco["annotations"])}
    checked = 0
    for image in coco["images"]:
        caption = first_caption[image["id"]]
        words = caption.rstrip(".").split()
        if not caption.startswith(("A ", "An ")) or " and " in caption:
            continue
        colour, place, background = words[1], words[-5], words[-2]
        pixels = Image.open(Path(data.captions[0].images) / image["file_name"])
        size = pixels.width
        x, y = PLACES[place]
        assert pixels.getpixel((int(x * size), int(y * size) + 3)) == COLOURS[colour], caption
        assert pixels.getpixel((0, 0)) == BACKGROUNDS[background], caption
        checked += 1
    assert checked > 60


def test_image_conversations_are_about_training_images_only(demo_data_config) -> None:
    data = demo_data_config.data
    chats = json.loads(Path(data.instructions[1].path).read_text())
    talked_about = {c["image"] for c in chats if "image" in c}
    assert talked_about
    assert {split_of(name, data.holdout_fraction) for name in talked_about} == {"train"}
    coco = json.loads(Path(data.captions[0].annotations).read_text())
    held_out = {im["file_name"] for im in coco["images"] if split_of(im["file_name"], data.holdout_fraction)
                == "holdout"}
    assert held_out and not talked_about & held_out


def test_image_conversations_ask_every_grounded_question(demo_data_config) -> None:
    chats = json.loads(Path(demo_data_config.data.instructions[1].path).read_text())
    questions = [t["value"].replace("<image>", "").strip() for c in chats if "image" in c
                 for t in c["conversations"] if t["from"] == "human"]
    for wording in ("What colour is the shape", "What shape is", "Where is the", "How many shapes are there?",
                    "What colour is the background?", "What is drawn here?"):
        assert sum(q.startswith(wording) for q in questions) >= 20, wording
    single = [c for c in chats if "image" in c and len(c["conversations"]) == 2]
    assert 60 <= len(single) <= 180  # single questions train the Alpaca-template form users ask in


def test_reading_tasks_answer_from_their_own_input_and_restate_one_in_four() -> None:
    """The demo base's reading texts: what each output names is in its input (so copying from the
    context is what it learns), and one in RESTATE_EVERY restates the scene."""
    tasks = reading_tasks(seed=0, count=40)
    assert tasks == reading_tasks(seed=0, count=40)
    assert tasks != reading_tasks(seed=1, count=40)
    restated = [i for i, task in enumerate(tasks) if task["instruction"] == "Describe the picture."]
    assert restated == list(range(RESTATE_EVERY - 1, 40, RESTATE_EVERY))
    for task in tasks:
        if task["instruction"] == "How many shapes are there?":  # counted, not copied
            continue
        named = {a: named_values(a, task["output"]) for a in ("colour", "shape", "place")}
        assert any(named.values()), task
        assert all(values <= named_values(a, task["input"]) for a, values in named.items()), task
