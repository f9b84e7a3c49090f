"""Grounded questions: the answers are parsed against the truth, the blind control is really blank."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llama_adapter_v2.config.schema import GroundedSource
from llama_adapter_v2.data.demo import GROUNDED_ATTRIBUTES, grounded_questions, plan_image
from llama_adapter_v2.evaluate.grounded import (
    blank_image,
    caption_names,
    chance_level,
    is_right,
    named_values,
    read_grounded,
)
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
