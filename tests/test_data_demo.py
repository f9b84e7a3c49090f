"""The demo generator: byte-identical output, the sizes asked for, captions that match the drawing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from llama_adapter_v2.data.demo import BACKGROUNDS, COLOURS, PLACES, generate_demo


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
    generate_demo(data)
    first, second = tree_digest(first_root / "data"), tree_digest(tmp_path / "data")
    assert len(first) == 240 + 3
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
    assert len(chats) == 120
    with_image = [c for c in chats if "image" in c]
    assert len(with_image) == 60
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
