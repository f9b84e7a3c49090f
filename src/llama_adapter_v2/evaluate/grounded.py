"""Grounded questions: does the model read the image, and does it beat a blind control?

Each question of ``data.grounded`` asks for one attribute the image fixes (the shape's colour,
the shape, where it is, how many shapes, the background colour). The answer is parsed for the
attribute's values and counts as right only when it names exactly the true one: naming every
colour earns nothing. The same questions are asked with every image replaced by a blank one
(the CLIP mean colour, all zeros after normalisation): a model that answers from the image
falls to chance there, a model that answers from the question's wording does not. Chance is
the share of the most common true answer, what a blind answerer that knows the answer
distribution gets by always giving it.

Where the question file describes each scene in words (``description``, as the demo's does), the
same questions are also asked with that description as the input and no image: the text
control. It bounds what the visual path can give: a base that cannot answer "What colour is the
shape?" about "A red circle on the left." will not answer it about a picture of one either, so a
low grounded accuracy with a low text control points at the base, not at the vision tower.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from llama_adapter_v2.config.schema import GroundedSource
from llama_adapter_v2.data.formatting import alpaca_prompt
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION
from llama_adapter_v2.infer.generation import GenerationSettings, Prompt, generate_texts, instruction_prompt

CLIP_MEAN_RGB = (123, 117, 104)  # round(255 * CLIP_MEAN): a blank image is zero after normalisation
COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray", "black")
VOCABULARY: dict[str, dict[str, str]] = {
    "colour": {word: word for word in COLOUR_WORDS},
    "background": {word: word for word in COLOUR_WORDS},
    "shape": {"circle": "circle", "square": "square", "triangle": "triangle"},
    "place": {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center"},
    "count": {"1": "1", "one": "1", "single": "1", "2": "2", "two": "2", "3": "3", "three": "3"},
}


@dataclass(frozen=True)
class GroundedItem:
    id: str
    image: str
    attribute: str
    question: str
    answer: str
    description: str = ""  # the scene in words (optional): the text control asks about it


REQUIRED_FIELDS = ("id", "image", "attribute", "question", "answer")


def read_grounded(source: GroundedSource) -> list[GroundedItem]:
    """The question file, every row checked (a bad row names the file, the row and the field)."""
    path = Path(source.questions)
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    items = []
    for position, row in enumerate(rows):
        fields = GroundedItem.__dataclass_fields__
        missing = [key for key in REQUIRED_FIELDS
                   if not isinstance(row, dict) or not isinstance(row.get(key), str)]
        if missing:
            raise ValueError(f"{path}: row {position}: needs text fields {missing}")
        if not isinstance(row.get("description", ""), str):
            raise ValueError(f"{path}: row {position}: 'description' must be text")
        if row["attribute"] not in VOCABULARY:
            raise ValueError(f"{path}: row {position}: attribute {row['attribute']!r} is not one of "
                             f"{sorted(VOCABULARY)}")
        items.append(GroundedItem(**{key: row[key] for key in fields if key in row}))
    return items


def named_values(attribute: str, text: str) -> set[str]:
    """The attribute's values an answer names ("It is red." -> {"red"})."""
    vocabulary = VOCABULARY[attribute]
    return {vocabulary[word] for word in re.findall(r"[a-z0-9]+", text.lower()) if word in vocabulary}


def is_right(attribute: str, text: str, truth: str) -> bool:
    return named_values(attribute, text) == {truth}


def blank_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), CLIP_MEAN_RGB)


def chance_level(answers: Sequence[str]) -> float:
    """The share of the most common answer: the best a blind constant answer scores."""
    return Counter(answers).most_common(1)[0][1] / len(answers) if answers else 0.0


def _accuracies(items: Sequence[GroundedItem], texts: Sequence[str]) -> dict[str, float]:
    by_attribute: dict[str, list[bool]] = {}
    for item, text in zip(items, texts, strict=True):
        by_attribute.setdefault(item.attribute, []).append(is_right(item.attribute, text, item.answer))
    return {attribute: sum(hits) / len(hits) for attribute, hits in sorted(by_attribute.items())}


def _summary(prefix: str, per_attribute: dict[str, float]) -> dict[str, float]:
    """``prefix`` = mean over attributes (each attribute weighs the same), ``prefix_<attribute>`` each."""
    metrics = {f"{prefix}_{attribute}": value for attribute, value in per_attribute.items()}
    metrics[prefix] = sum(per_attribute.values()) / len(per_attribute)
    return metrics


SHAPE_COLOURS = frozenset(COLOUR_WORDS) - {"white", "gray", "black"}
# What a demo caption's words say about the drawing, for the held-out caption loss split by word
# (infer.holdout.image_control_losses): the background's colours are never a shape's.
CAPTION_WORD_GROUPS: dict[str, list[str]] = {
    "colour": sorted(SHAPE_COLOURS), "background": ["black", "gray", "white"],
    "shape": sorted(VOCABULARY["shape"]), "place": sorted(VOCABULARY["place"]),
}


def caption_names(caption: str, colour: str, shape: str) -> tuple[bool, bool]:
    """Whether a caption of a one-shape drawing names exactly its colour and exactly its shape
    (the background's colour may be named too: it is never a shape's colour)."""
    colours = named_values("colour", caption) & SHAPE_COLOURS
    return colours == {colour}, named_values("shape", caption) == {shape}


def _one_shape_drawings(items: Sequence[GroundedItem]) -> dict[str, tuple[str, str]]:
    """image -> (colour, shape) for the drawings whose count answer is one."""
    truth: dict[str, dict[str, str]] = {}
    for item in items:
        truth.setdefault(item.image, {})[item.attribute] = item.answer
    return {image: (t["colour"], t["shape"]) for image, t in sorted(truth.items())
            if t.get("count") == "1" and "colour" in t and "shape" in t}


def _caption_metrics(
    model: Any, tokenizer: Any, items: Sequence[GroundedItem], *, images: dict[str, Image.Image],
    blank: Image.Image, settings: GenerationSettings,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Captions of the one-shape drawings: the share that name the drawn colour and shape."""
    truth = _one_shape_drawings(items)
    if not truth:
        return {}, []
    prompt = alpaca_prompt(CAPTION_INSTRUCTION, "")
    names = list(truth)
    seen = generate_texts(model, tokenizer, [Prompt(prompt, images[n]) for n in names], settings)
    blind = generate_texts(model, tokenizer, [Prompt(prompt, blank)] * len(names), settings)
    metrics: dict[str, float] = {}
    for suffix, captions in (("", seen), ("_blind", blind)):
        hits = [caption_names(c, *truth[n]) for n, c in zip(names, captions, strict=True)]
        metrics[f"grounded_caption_colour{suffix}"] = sum(h[0] for h in hits) / len(hits)
        metrics[f"grounded_caption_shape{suffix}"] = sum(h[1] for h in hits) / len(hits)
    rows = [{"image": n, "colour": truth[n][0], "shape": truth[n][1], "caption": c, "blind_caption": b}
            for n, c, b in zip(names, seen, blind, strict=True)]
    return metrics, rows


def evaluate_grounded(
    model: Any, tokenizer: Any, source: GroundedSource, out: Path, *, max_new_tokens: int = 12,
    batch_size: int = 32,
) -> dict[str, float]:
    """``grounded_accuracy[_<attribute>]``, the blind and text controls' and the chance levels; rows
    to ``out``."""
    items = read_grounded(source)
    if not items:
        raise ValueError(f"{source.questions}: no grounded questions")
    images: dict[str, Image.Image] = {}
    for item in items:
        if item.image not in images:
            with Image.open(Path(source.images) / item.image) as raw:
                images[item.image] = raw.convert("RGB")
    blank = blank_image(next(iter(images.values())).width)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = [alpaca_prompt(item.question, "") for item in items]
    seen = generate_texts(model, tokenizer, [Prompt(p, images[i.image]) for p, i in zip(prompts, items,
                                                                                      strict=True)], settings)
    blind = generate_texts(model, tokenizer, [Prompt(p, blank) for p in prompts], settings)
    chance = {
        attribute: chance_level([i.answer for i in items if i.attribute == attribute])
        for attribute in sorted({i.attribute for i in items})
    }
    in_words = None
    if all(item.description for item in items):
        described = [instruction_prompt(item.question, item.description) for item in items]
        in_words = generate_texts(model, tokenizer, described, settings)
    metrics = _summary("grounded_accuracy", _accuracies(items, seen))
    metrics |= _summary("grounded_accuracy_blind", _accuracies(items, blind))
    if in_words is not None:
        metrics |= _summary("grounded_accuracy_text", _accuracies(items, in_words))
    metrics |= _summary("grounded_chance", chance)
    caption_settings = GenerationSettings(max_new_tokens=32, batch_size=batch_size)
    caption_metrics, caption_rows = _caption_metrics(
        model, tokenizer, items, images=images, blank=blank, settings=caption_settings
    )
    metrics |= caption_metrics
    text_rows = [{} for _ in items] if in_words is None else [
        {"text_answer": text, "text_right": is_right(item.attribute, text, item.answer)}
        for item, text in zip(items, in_words, strict=True)
    ]
    rows = [
        {"id": item.id, "attribute": item.attribute, "question": item.question, "truth": item.answer,
         "answer": answer, "right": is_right(item.attribute, answer, item.answer),
         "blind_answer": blind_answer, "blind_right": is_right(item.attribute, blind_answer, item.answer)}
        | text_row
        for item, answer, blind_answer, text_row in zip(items, seen, blind, text_rows, strict=True)
    ]
    out.mkdir(parents=True, exist_ok=True)
    report = {"questions": rows, "captions": caption_rows}
    (out / "grounded.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return metrics
