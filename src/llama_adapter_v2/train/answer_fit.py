"""Fit the adapter on the answer word alone, about freshly drawn demo scenes (issue 13's diagnostic).

The demo's training mixes captions, text tasks and a few hundred image conversations, so a weak
grounded answer may come from that mix, from the schedule or from the visual path itself. This
fit leaves only the last: every batch draws new scenes (a drawing never repeats), asks the chosen
grounded questions in the instruction template, and trains on the cross-entropy of the answer
word among the values the generator can draw for that attribute, teacher-forced after the
reply's opening words ("What colour is the background?" -> "It is ___"). What it learns is what
the visual path and the frozen base can learn to read, question by question; the fixed test
scenes are drawn from their own seed, the same for every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional

from llama_adapter_v2.data.demo import (
    BACKGROUNDS,
    COLOURS,
    GROUNDED_ATTRIBUTES,
    PLACES,
    SHAPES,
    DrawnImage,
    GroundedQuestion,
    draw,
    grounded_questions,
    plan_image,
)
from llama_adapter_v2.data.formatting import alpaca_prompt
from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.trainable import GROUPS, Group

Optimizer = Literal["adamw", "sgd"]
TEST_SEED = "answer-fit-test"
# The word of the reply that carries the answer, and the values it can take: what the generator
# draws, so chance is one in len(values). The count's is its verb ("There is one shape."), the
# first word that depends on the picture; a number after "There is" would be given away. The
# place's reply starts "In the" for the center alone, so its slot gives the center away.
ANSWER_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(sorted(COLOURS)),
    "background": tuple(sorted(BACKGROUNDS)),
    "shape": SHAPES,
    "place": tuple(sorted(PLACES)),
    "count": ("is", "are"),
}


class AnswerFitError(ValueError):
    """Settings the fit cannot run with (an unknown attribute, values the tokenizer merges)."""


@dataclass(frozen=True)
class AnswerFitSettings:
    attributes: tuple[str, ...] = GROUNDED_ATTRIBUTES
    steps: int = 500
    lr: float = 3e-3
    optimizer: Optimizer = "adamw"
    groups: tuple[Group, ...] = GROUPS
    batch_size: int = 16
    eval_every: int = 100
    n_test: int = 300
    one_shape: bool = False
    image_size: int = 64
    seed: int = 0

    def check(self) -> None:
        unknown = sorted(set(self.attributes) - set(ANSWER_VALUES))
        if unknown or not self.attributes:
            raise AnswerFitError(
                f"attributes must be one or more of {list(ANSWER_VALUES)}; got {unknown or 'none'}"
            )
        if self.optimizer not in ("adamw", "sgd"):
            raise AnswerFitError(f"optimizer must be adamw or sgd; got {self.optimizer!r}")
        if not self.groups or set(self.groups) - set(GROUPS):
            raise AnswerFitError(f"groups must name one or both of {list(GROUPS)}; got {list(self.groups)}")
        if self.steps < 0 or self.batch_size < 1 or self.eval_every < 1 or self.n_test < 1 or self.lr <= 0:
            raise AnswerFitError("steps >= 0, lr > 0, and batch_size, eval_every and n_test >= 1 are needed")


@dataclass(frozen=True)
class AnswerSlot:
    """One question about one scene: the prompt up to the answer word, and which value is right."""

    scene: DrawnImage
    attribute: str
    token_ids: list[int]
    right: int


@dataclass(frozen=True)
class ValueTokens:
    """How the tokenizer writes an attribute's values after a space: the tokens they all start with
    (a lone space in a small BPE), then the first token that tells them apart, one per value."""

    shared: list[int]
    first: list[int]


def value_tokens(tokenizer: Any, attribute: str) -> ValueTokens:
    values = ANSWER_VALUES[attribute]
    encodings = [tokenizer.encode(" " + value, add_special_tokens=False) for value in values]
    shared = 0
    while all(len(e) > shared + 1 for e in encodings) and len({e[shared] for e in encodings}) == 1:
        shared += 1
    first = [e[shared] for e in encodings]
    if len(set(first)) != len(first):
        raise AnswerFitError(f"the tokenizer writes several {attribute} values with one first token: "
                             f"{dict(zip(values, encodings, strict=True))}")
    return ValueTokens(encodings[0][:shared], first)


def answer_slot(tokenizer: Any, scene: DrawnImage, question: GroundedQuestion, tokens: ValueTokens
                ) -> AnswerSlot:
    words = question.reply.rstrip(".").split(" ")
    values = ANSWER_VALUES[question.attribute]
    position = next(i for i, word in enumerate(words) if word in values)
    prompt = f"{alpaca_prompt(question.question, '')} {' '.join(words[:position])}".rstrip()
    token_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False), *tokens.shared]
    return AnswerSlot(scene, question.attribute, token_ids, values.index(words[position]))


def draw_slots(rng: random.Random, tokenizer: Any, settings: AnswerFitSettings,
               tokens: dict[str, ValueTokens], count: int) -> list[AnswerSlot]:
    """``count`` questions of the chosen attributes about new scenes, in a seeded shuffle."""
    slots: list[AnswerSlot] = []
    while len(slots) < count:
        scene = plan_image(rng, 0)
        if settings.one_shape and len(scene.shapes) > 1:
            continue
        asked = [q for q in grounded_questions(rng, scene) if q.attribute in settings.attributes]
        slots += [answer_slot(tokenizer, scene, q, tokens[q.attribute]) for q in asked]
    rng.shuffle(slots)
    return slots[:count]


@dataclass(frozen=True)
class SlotReader:
    """How a batch of slots becomes logits: each attribute's value tokens, padding, drawing size."""

    value_ids: dict[str, list[int]]
    pad_id: int
    image_size: int

    def logits(self, model: LlamaAdapterV2, slots: Sequence[AnswerSlot]) -> list[torch.Tensor]:
        """Each slot's logits over its attribute's values, from one left-padded batch."""
        assert model.image_transform is not None
        width = max(len(slot.token_ids) for slot in slots)
        input_ids = torch.full((len(slots), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, slot in enumerate(slots):
            input_ids[row, width - len(slot.token_ids):] = torch.tensor(slot.token_ids)
            attention[row, width - len(slot.token_ids):] = 1
        images = torch.stack([model.image_transform(draw(slot.scene, self.image_size)) for slot in slots])
        last = model(input_ids, attention_mask=attention, images=images).logits[:, -1]
        return [last[row, self.value_ids[slot.attribute]] for row, slot in enumerate(slots)]

    def accuracy(self, model: LlamaAdapterV2, slots: Sequence[AnswerSlot], batch_size: int = 100
                 ) -> dict[str, float]:
        """Per attribute and their mean (``mean``): how often the right value has the largest logit."""
        hits: dict[str, list[bool]] = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(slots), batch_size):
                chunk = slots[start:start + batch_size]
                for slot, logits in zip(chunk, self.logits(model, chunk), strict=True):
                    hits.setdefault(slot.attribute, []).append(int(logits.argmax()) == slot.right)
        model.train(was_training)
        scores = {attribute: sum(found) / len(found) for attribute, found in sorted(hits.items())}
        return scores | {"mean": sum(scores.values()) / len(scores)}


def make_optimizer(parameters: list[torch.nn.Parameter], settings: AnswerFitSettings
                   ) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)


def fit_answers(model: LlamaAdapterV2, tokenizer: Any, settings: AnswerFitSettings,
                report: Callable[[dict[str, float]], None] = lambda row: None) -> list[dict[str, float]]:
    """Train ``settings.groups`` of ``model`` on answer words; test accuracy every ``eval_every`` steps."""
    settings.check()
    if model.image_transform is None:
        raise AnswerFitError("this adapter has no visual path (model.adapter: no visual layers): "
                             "there is nothing to fit the answers to")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = {attribute: value_tokens(tokenizer, attribute) for attribute in settings.attributes}
    reader = SlotReader({a: t.first for a, t in tokens.items()}, pad_id, settings.image_size)
    test = draw_slots(random.Random(TEST_SEED), tokenizer, settings, tokens, settings.n_test)
    model.set_trainable(settings.groups)
    trained = [p for g in settings.groups for _, p in model.parameter_groups()[g]]
    optimizer = make_optimizer(trained, settings)
    rng = random.Random(f"answer-fit-{settings.seed}")
    model.train()
    history = []
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            history.append({"step": float(step)} | reader.accuracy(model, test))
            report(history[-1])
        if step == settings.steps:
            break
        batch = draw_slots(rng, tokenizer, settings, tokens, settings.batch_size)
        logits = reader.logits(model, batch)
        loss = torch.stack([functional.cross_entropy(row[None], torch.tensor([slot.right]))
                            for row, slot in zip(logits, batch, strict=True)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return history
