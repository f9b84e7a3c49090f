"""Multiple-choice benchmarks by log-likelihood, from local JSONL files in the MMLU layout.

Each line is ``{"question": str, "choices": [str, ...], "answer": int | "A".."Z" | choice text}``
(an optional ``"subject"`` groups results). As INSTRUCTEVAL and lm-eval score such benchmarks
without free generation, every choice is scored as the continuation of the question's prompt:
the sum of its token log-probabilities (``accuracy``) and their mean per token
(``accuracy_norm``, which does not favour short choices); the argmax is the prediction.
"""

from __future__ import annotations

import json
import statistics
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_adapter_v2.data.formatting import alpaca_prompt
from llama_adapter_v2.infer.likelihood import continuation_log_likelihoods
from llama_adapter_v2.model.adapter import LlamaAdapterV2


class ChoiceFileError(ValueError):
    """A malformed line of a multiple-choice file: names the file, line and rule."""


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = "all"


def _answer_index(raw: object, choices: Sequence[str]) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw if 0 <= raw < len(choices) else None
    if isinstance(raw, str):
        letters = string.ascii_uppercase[: len(choices)]
        if len(raw.strip()) == 1 and raw.strip().upper() in letters:
            return letters.index(raw.strip().upper())
        if raw in choices:
            return choices.index(raw)
    return None


def _parse_line(path: Path, number: int, line: str) -> ChoiceItem:
    def fail(rule: str) -> ChoiceFileError:
        return ChoiceFileError(f"{path}:{number}: {rule}")

    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise fail(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(item, dict):
        raise fail("each line must be a JSON object with question, choices, answer")
    question, choices = item.get("question"), item.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise fail("'question' must be a non-empty string")
    well_formed = isinstance(choices, list) and all(isinstance(c, str) and c for c in choices)
    if not well_formed or len(choices) < 2:
        raise fail("'choices' must be a list of at least two non-empty strings")
    answer = _answer_index(item.get("answer"), choices)
    if answer is None:
        raise fail(f"'answer' {item.get('answer')!r} is not a choice index, letter or choice text")
    return ChoiceItem(question, tuple(choices), answer, str(item.get("subject", "all")))


def read_choice_items(path: Path | str) -> list[ChoiceItem]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    items = [_parse_line(path, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not items:
        raise ChoiceFileError(f"{path}: no questions")
    return items


def choice_log_likelihoods(
    model: LlamaAdapterV2, tokenizer: Any, item: ChoiceItem
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each choice after the question's prompt."""
    return continuation_log_likelihoods(model, tokenizer, alpaca_prompt(item.question, ""), item.choices)


def score_multiple_choice(
    model: LlamaAdapterV2, tokenizer: Any, items: Sequence[ChoiceItem]
) -> dict[str, float]:
    """``accuracy`` (sum), ``accuracy_norm`` (per-token mean), per subject too, and ``n``."""
    by_subject: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for item in items:
        scores = choice_log_likelihoods(model, tokenizer, item)
        by_sum = max(range(len(scores)), key=lambda i: scores[i][0])
        by_mean = max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
        by_subject[item.subject].append((float(by_sum == item.answer), float(by_mean == item.answer)))
    every = [pair for pairs in by_subject.values() for pair in pairs]
    result = {
        "accuracy": statistics.fmean(a for a, _ in every),
        "accuracy_norm": statistics.fmean(b for _, b in every),
        "n": float(len(every)),
    }
    if len(by_subject) > 1:
        for subject, pairs in sorted(by_subject.items()):
            result[f"{subject}/accuracy"] = statistics.fmean(a for a, _ in pairs)
    return result
