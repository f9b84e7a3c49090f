"""Instruction metrics: exact match and ROUGE-L per task, and sensitivity to the instruction's wording.

ROUGE-L is pycocoevalcap's (LCS F-measure with beta 1.2, the COCO caption scorer), applied to
lower-cased word tokens so that punctuation and case do not decide a match. Exact match compares
answers after the SQuAD-style normalisation (case, punctuation, articles, whitespace).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pycocoevalcap.rouge.rouge import Rouge

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_ARTICLES = {"a", "an", "the"}


@dataclass(frozen=True)
class InstructionSample:
    """One generated answer with its reference and the task it belongs to."""

    task: str
    prediction: str
    reference: str


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits of any script); punctuation dropped."""
    return _WORD.findall(text.lower())


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(word for word in words(text) if word not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference (0 when either has no words)."""
    candidate, target = " ".join(words(prediction)), " ".join(words(reference))
    if not candidate or not target:
        return float(candidate == target)
    return float(Rouge().calc_score([candidate], [target]))


def score_instructions(samples: Iterable[InstructionSample]) -> dict[str, float]:
    """Mean exact match and ROUGE-L over all samples, and per task as ``<task>/exact_match`` etc."""
    per_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sample in samples:
        prediction, reference = sample.prediction, sample.reference
        per_task[sample.task].append((exact_match(prediction, reference), rouge_l(prediction, reference)))
    if not per_task:
        raise ValueError("no instruction samples to score")
    every = [pair for pairs in per_task.values() for pair in pairs]
    result = {
        "exact_match": statistics.fmean(em for em, _ in every),
        "rouge_l": statistics.fmean(rl for _, rl in every),
    }
    for task, pairs in sorted(per_task.items()):
        result[f"{task}/exact_match"] = statistics.fmean(em for em, _ in pairs)
        result[f"{task}/rouge_l"] = statistics.fmean(rl for _, rl in pairs)
    return result


@dataclass(frozen=True)
class Spread:
    """A metric over several phrasings of one instruction (MultiInstruct's sensitivity).

    ``sensitivity`` is MultiInstruct's definition: the standard deviation over phrasings divided
    by their mean (0 when the mean is 0); ``std`` is the population standard deviation.
    """

    mean: float
    std: float
    range: float
    sensitivity: float


def spread(values_by_phrasing: Mapping[str, float]) -> Spread:
    values = list(values_by_phrasing.values())
    if len(values) < 2:
        raise ValueError("instruction sensitivity needs at least two phrasings")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"non-finite metric among phrasings: {values_by_phrasing}")
    mean = statistics.fmean(values)
    std = statistics.pstdev(values)
    sensitivity = std / mean if mean else 0.0
    return Spread(mean=mean, std=std, range=max(values) - min(values), sensitivity=sensitivity)
