"""Grounded questions: the answers are parsed against the truth, the blind control is really blank."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_adapted import random_gates, tiny_config, write_tiny_base

from llama_adapter_v2.config.schema import GroundedSource
from llama_adapter_v2.data.demo import GROUNDED_ATTRIBUTES, description, draw, grounded_questions, plan_image
from llama_adapter_v2.data.formatting import alpaca_prompt
from llama_adapter_v2.evaluate.grounded import (
    blank_image,
    caption_names,
    chance_level,
    evaluate_grounded,
    is_right,
    named_values,
    read_grounded,
)
from llama_adapter_v2.infer.generation import GenerationSettings, Prompt, generate_texts
from llama_adapter_v2.model.build import build_model, load_tokenizer
from llama_adapter_v2.model.vision import ClipImageTransform


@pytest.mark.parametrize(
    ("attribute", "answer", "truth", "right"),
    [
        ("colour", "It is red.", "red", True),
        ("colour", "It is red and blue.", "red", False),  # naming every colour earns nothing
        ("colour", "Red.", "red", True),
        ("colour", "It is a square.", "red", False),
        ("shape", "It is a circle.", "circle", True),
        ("shape", "A circle or a square", "circle", False),
        ("place", "On the left.", "left", True),
        ("place", "In the center.", "center", True),
        ("count", "There are two shapes.", "2", True),
        ("count", "2", "2", True),
        ("count", "There is one shape.", "2", False),
        ("background", "It is gray.", "gray", True),
        ("background", "", "gray", False),
    ],
)
def test_answers_are_parsed_against_the_truth(attribute: str, answer: str, truth: str, right: bool) -> None:
    assert is_right(attribute, answer, truth) is right


def test_named_values_reads_words_not_substrings() -> None:
    assert named_values("colour", "bluebird redness") == set()
    assert named_values("count", "one or 2") == {"1", "2"}


def test_caption_check_allows_the_background_colour() -> None:
    assert caption_names("A red circle on the left of a white background.", "red", "circle") == (True, True)
    assert caption_names("A blue circle.", "red", "circle") == (False, True)
    assert caption_names("A red circle and a red square.", "red", "circle") == (True, False)


def test_chance_is_the_most_common_answer_share() -> None:
    assert chance_level(["red", "red", "blue", "green"]) == 0.5
    assert chance_level([]) == 0.0


def test_the_blank_image_is_zero_after_clip_normalisation() -> None:
    pixels = ClipImageTransform(32)(blank_image(64))
    assert pixels.abs().max() < 0.01  # the CLIP mean colour, rounded to 8-bit values


def test_every_question_has_one_answer_the_drawing_fixes() -> None:
    rng = random.Random(3)
    for index in range(200):
        image = plan_image(rng, index)
        questions = grounded_questions(rng, image)
        assert [q.attribute for q in questions] == list(GROUNDED_ATTRIBUTES)
        by = {q.attribute: q for q in questions}
        assert by["count"].answer == str(len(image.shapes))
        assert by["background"].answer == image.background
        shapes = [s for s in image.shapes if s.colour == by["colour"].answer]
        assert len(shapes) == 1  # the colour question names one shape, and its answer is that shape's
        for q in questions:  # the training reply is one the parser scores right
            assert is_right(q.attribute, q.reply, q.answer), (q.question, q.reply)


def test_bad_question_rows_name_the_row(tmp_path: Path) -> None:
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "a", "image": "x.png", "attribute": "mood", "question": "?",
                                      "answer": "happy"}]))
    with pytest.raises(ValueError, match=r"q\.json: row 0: attribute 'mood'"):
        read_grounded(GroundedSource(questions=questions, images=tmp_path))
    questions.write_text(json.dumps([{"id": "a", "image": "x.png"}]))
    with pytest.raises(ValueError, match=r"row 0: needs text fields \['attribute', 'question', 'answer'\]"):
        read_grounded(GroundedSource(questions=questions, images=tmp_path))


def test_probe_set_is_written_beside_the_demo(demo_data_config) -> None:
    grounded = demo_data_config.data.grounded
    rows = json.loads(Path(grounded.questions).read_text())
    images = {row["image"] for row in rows}
    assert len(images) == demo_data_config.data.demo.n_probe_images
    assert len(rows) == len(images) * len(GROUNDED_ATTRIBUTES)
    assert all((Path(grounded.images) / name).is_file() for name in images)
    training = {Path(p).name for p in Path(demo_data_config.data.captions[0].images).iterdir()}
    assert not images & training  # new drawings, never a training image
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:  # the text control's input names the answer (the count is said as a template)
        if row["attribute"] != "count":
            assert row["answer"] in named_values(row["attribute"], row["description"]), row


def test_a_scene_description_names_every_attribute_but_the_count() -> None:
    rng = random.Random(5)
    for index in range(100):
        image = plan_image(rng, index)
        said = description(image)
        colours = {s.colour for s in image.shapes}
        assert named_values("colour", said) == colours | {image.background}
        assert named_values("shape", said) == {s.kind for s in image.shapes}
        assert named_values("place", said) == {s.place for s in image.shapes}


def test_the_text_control_asks_about_the_description_without_an_image(tmp_path: Path) -> None:
    cfg = tiny_config(write_tiny_base(tmp_path / "base"))
    model = build_model(cfg).eval()
    random_gates(model)
    tokenizer = load_tokenizer(cfg)
    rng = random.Random(0)
    rows = []
    for index in range(3):
        image = plan_image(rng, index, prefix="probe")
        draw(image, 32).save(tmp_path / image.file_name)
        rows += [{"id": f"{index}:{q.attribute}", "image": image.file_name, "attribute": q.attribute,
                  "question": q.question, "answer": q.answer, "description": description(image)}
                 for q in grounded_questions(rng, image)]
    source = GroundedSource(questions=tmp_path / "q.json", images=tmp_path)
    source.questions.write_text(json.dumps(rows))
    metrics = evaluate_grounded(model, tokenizer, source, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "grounded.json").read_text())["questions"]
    by_hand = generate_texts(model, tokenizer, [Prompt(alpaca_prompt(r["question"], r["description"]))
                                                for r in rows], GenerationSettings(max_new_tokens=12))
    assert [r["text_answer"] for r in report] == by_hand
    for attribute in GROUNDED_ATTRIBUTES:
        hits = [r["text_right"] for r in report if r["attribute"] == attribute]
        assert metrics[f"grounded_accuracy_text_{attribute}"] == sum(hits) / len(hits)
    assert metrics["grounded_accuracy_text"] == pytest.approx(
        sum(metrics[f"grounded_accuracy_text_{a}"] for a in GROUNDED_ATTRIBUTES) / len(GROUNDED_ATTRIBUTES))
    # a question file without descriptions (any other than the demo's) has no text control
    undescribed = [{key: value for key, value in row.items() if key != "description"} for row in rows]
    source.questions.write_text(json.dumps(undescribed))
    plain = evaluate_grounded(model, tokenizer, source, tmp_path / "plain")
    assert not [name for name in plain if "_text" in name]
    assert plain["grounded_accuracy"] == metrics["grounded_accuracy"]
