"""Generate for the held-out samples and score what comes out: captions (COCO metrics and their
spread over phrasings), instructions (exact match and ROUGE-L per task), multiple-choice files,
and the held-out losses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.cider.cider import Cider

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.formatting import alpaca_prompt, prompt_text
from llama_adapter_v2.data.records import Kind, Record
from llama_adapter_v2.evaluate.caption_metrics import score_captions, write_per_image
from llama_adapter_v2.evaluate.heldout import HeldOut
from llama_adapter_v2.evaluate.instruction_metrics import (
    InstructionSample,
    score_instructions,
    spread,
    words,
)
from llama_adapter_v2.evaluate.multiple_choice import read_choice_items, score_multiple_choice
from llama_adapter_v2.evaluate.options import EvalOptions
from llama_adapter_v2.evaluate.report import write_json_atomic
from llama_adapter_v2.infer.generation import GenerationSettings, Prompt, generate_texts
from llama_adapter_v2.infer.holdout import holdout_loss_sums, mean_loss
from llama_adapter_v2.model.adapter import LlamaAdapterV2

TASKS: tuple[Kind, ...] = ("caption", "instruction")


def metric_key(text: str) -> str:
    """A flat metric name part: lower case, runs of other characters become one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def task_of(record: Record) -> str:
    return metric_key(str(record.meta.get("task") or record.source))


def _caption_cider(references: dict[str, list[str]], candidates: dict[str, str]) -> float:
    """CIDEr-D on word tokens without the Java tokenizer (cheap enough to repeat per phrasing)."""
    refs = {k: [" ".join(words(r)) for r in references[k]] for k in candidates}
    cands = {k: [" ".join(words(v)) or "<empty>"] for k, v in candidates.items()}
    score, _ = Cider().compute_score(refs, cands)
    return float(score)


def evaluate_captions(
    model: Any, tokenizer: Any, held: HeldOut, options: EvalOptions, out: Path
) -> dict[str, float]:
    settings = GenerationSettings(max_new_tokens=options.caption_tokens, batch_size=options.batch_size)
    keys = list(held.images)
    per_phrasing: dict[str, dict[str, str]] = {}
    for phrasing in options.phrasings:
        prompts = [Prompt(alpaca_prompt(phrasing, ""), held.images[k]) for k in keys]
        per_phrasing[phrasing] = dict(
            zip(keys, generate_texts(model, tokenizer, prompts, settings), strict=True)
        )
    candidates = per_phrasing[options.phrasings[0]]
    references = {k: held.references[k] for k in keys}
    scores = score_captions(references, candidates)
    write_per_image(out / "captions.json", scores, references, candidates)
    metrics = {f"caption_{name}": value for name, value in scores.corpus.items()}
    if len(options.phrasings) > 1:
        cider = {p: _caption_cider(references, c) for p, c in per_phrasing.items()}
        result = spread(cider)
        metrics |= {
            "caption_cider_words_phrasing_mean": result.mean,
            "caption_cider_words_phrasing_std": result.std,
            "caption_cider_words_phrasing_range": result.range,
            "caption_cider_words_sensitivity": result.sensitivity,
        }
        write_json_atomic(out / "caption_phrasings.json", {"cider_words": cider, "captions": per_phrasing})
    return metrics


def evaluate_instructions(
    model: Any, tokenizer: Any, held: HeldOut, options: EvalOptions, out: Path
) -> dict[str, float]:
    settings = GenerationSettings(max_new_tokens=options.instruction_tokens, batch_size=options.batch_size)
    prompts = [Prompt(prompt_text(record), image) for record, image in held.instructions]
    answers = generate_texts(model, tokenizer, prompts, settings)
    samples = [
        InstructionSample(task_of(record), answer, record.response)
        for (record, _), answer in zip(held.instructions, answers, strict=True)
    ]
    rows = [
        {
            "id": record.id,
            "task": s.task,
            "prompt": p.text,
            "prediction": s.prediction,
            "reference": s.reference,
        }
        for (record, _), p, s in zip(held.instructions, prompts, samples, strict=True)
    ]
    write_json_atomic(out / "instructions.json", rows)
    scores = score_instructions(samples)
    return {f"instruction_{metric_key(name)}": value for name, value in scores.items()}


def holdout_losses(model: LlamaAdapterV2, tokenizer: Any, cfg: Config) -> dict[str, float]:
    """Token-weighted mean loss over each task's whole held-out split (``<task>_loss``)."""
    device = next(model.parameters()).device
    return {f"{task}_loss": mean_loss(holdout_loss_sums(model, tokenizer, cfg, task, device=device))
            for task in TASKS}


def evaluate_choice_files(model: Any, tokenizer: Any, files: Sequence[Path]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for path in files:
        result = score_multiple_choice(model, tokenizer, read_choice_items(path))
        metrics |= {f"mc_{metric_key(Path(path).stem)}_{metric_key(k)}": v for k, v in result.items()}
    return metrics
