"""Instruction metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from llama_adapter_v2.evaluate.instruction_metrics import (
    InstructionSample,
    exact_match,
    normalize_answer,
    rouge_l,
    score_instructions,
    spread,
)


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert normalize_answer("  The Sky is BLUE. ") == "sky is blue"
    assert exact_match("The sky is blue.", "sky is blue") == 1.0
    assert exact_match("7", "8") == 0.0
    assert exact_match("", "") == 1.0


def test_rouge_l_lcs_f_measure_with_beta_1_2() -> None:
    assert rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # LCS 3: P = 1, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    beta2 = 1.2**2
    assert rouge_l("a b c", "a b c d e") == pytest.approx((1 + beta2) * 0.6 / (0.6 + beta2))
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a b") == 0.0


def test_scores_per_task_and_overall() -> None:
    samples = [
        InstructionSample("sum", "7", "7"),
        InstructionSample("sum", "8", "7"),
        InstructionSample("repeat", "red blue", "red blue green"),
    ]
    scores = score_instructions(samples)
    repeat_rouge = (1 + 1.44) * 1.0 * (2 / 3) / ((2 / 3) + 1.44 * 1.0)
    assert scores["sum/exact_match"] == 0.5
    assert scores["sum/rouge_l"] == 0.5
    assert scores["repeat/exact_match"] == 0.0
    assert scores["repeat/rouge_l"] == pytest.approx(repeat_rouge)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1 + 0 + repeat_rouge) / 3)
    with pytest.raises(ValueError, match="no instruction samples"):
        score_instructions([])


def test_spread_over_phrasings() -> None:
    result = spread({"Describe the image.": 0.2, "Caption this.": 0.4, "What is shown?": 0.6})
    assert result.mean == pytest.approx(0.4)
    assert result.std == pytest.approx(math.sqrt(0.08 / 3))
    assert result.range == pytest.approx(0.4)
    assert result.sensitivity == pytest.approx(math.sqrt(0.08 / 3) / 0.4)
    assert spread({"a": 0.0, "b": 0.0}).sensitivity == 0.0
    with pytest.raises(ValueError, match="at least two phrasings"):
        spread({"only": 1.0})
