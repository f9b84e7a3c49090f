"""The evaluation run: held-out captions and instructions, optional multiple-choice files.

``evaluate(cfg, adapter_dir)`` generates a caption per held-out image and an answer per held-out
instruction record, scores them (COCO caption metrics; exact match and ROUGE-L per task), adds
the held-out losses, the caption metric's spread over several phrasings of the caption
instruction (MultiInstruct's sensitivity) and any MMLU-layout files, and writes flat metrics
to ``<training.output_dir>/eval/metrics.json`` (DVC metrics) beside per-sample outputs and a
markdown table; with tracking on, the same go to MLflow. ``adapter_dir=None`` evaluates the
zero-init model (the frozen base), the baseline a trained adapter must beat.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.formatting import alpaca_prompt, prompt_text
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION, Record
from llama_adapter_v2.evaluate.caption_metrics import score_captions, write_per_image
from llama_adapter_v2.evaluate.generation import GenerationSettings, Prompt, generate_texts
from llama_adapter_v2.evaluate.grounded import evaluate_grounded
from llama_adapter_v2.evaluate.instruction_metrics import (
    InstructionSample,
    score_instructions,
    spread,
    words,
)
from llama_adapter_v2.evaluate.report import metrics_table, write_json_atomic

log = logging.getLogger(__name__)

CAPTION_PHRASINGS: tuple[str, ...] = (
    CAPTION_INSTRUCTION,
    "Describe this image.",
    "Write a short caption for the picture.",
    "What does this image show?",
)
TASKS = ("caption", "instruction")


@dataclass(frozen=True)
class EvalOptions:
    """How much to generate; ``max_*`` cap the held-out samples (None: all of them)."""

    caption_tokens: int = 32
    instruction_tokens: int = 48
    batch_size: int = 16
    max_images: int | None = None
    max_instructions: int | None = None
    choice_files: tuple[Path, ...] = ()
    phrasings: tuple[str, ...] = CAPTION_PHRASINGS
    out_dir: Path | None = None
    run_id: str | None = None
    log_to_mlflow: bool = True


@dataclass
class HeldOut:
    """Held-out captions grouped by image, and held-out instruction records with their images."""

    images: dict[str, Image.Image] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    instructions: list[tuple[Record, Image.Image | None]] = field(default_factory=list)


def holdout_dir(cfg: Config, task: str) -> Path:
    return cfg.data.work_dir / "shards" / task / "holdout"


def read_holdout_records(folder: Path) -> Iterator[tuple[Record, Image.Image | None]]:
    """Every record of a shard folder with its decoded RGB image, in index order."""
    from llama_adapter_v2.data.shards import ShardIndex

    index = ShardIndex.load(folder)
    for entry in index.samples:
        with (folder / index.shards[entry.shard]["file"]).open("rb") as handle:
            handle.seek(entry.json[0])
            record = Record.from_dict(json.loads(handle.read(entry.json[1])))
            image = None
            if entry.image is not None:
                handle.seek(entry.image[0])
                with Image.open(io.BytesIO(handle.read(entry.image[1]))) as raw:
                    image = raw.convert("RGB")
        yield record, image


def load_holdout(cfg: Config, options: EvalOptions) -> HeldOut:
    held = HeldOut()
    for record, image in read_holdout_records(holdout_dir(cfg, "caption")):
        key = record.image or record.id
        if key not in held.images:
            if options.max_images is not None and len(held.images) >= options.max_images:
                continue
            if image is None:
                raise ValueError(f"{holdout_dir(cfg, 'caption')}: caption record {record.id} has no image")
            held.images[key] = image
        held.references.setdefault(key, []).append(record.response)
    for record, image in read_holdout_records(holdout_dir(cfg, "instruction")):
        if options.max_instructions is not None and len(held.instructions) >= options.max_instructions:
            break
        held.instructions.append((record, image))
    return held


def metric_key(text: str) -> str:
    """A flat metric name part: lower case, runs of other characters become one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def task_of(record: Record) -> str:
    return metric_key(str(record.meta.get("task") or record.source))


def _caption_cider(references: dict[str, list[str]], candidates: dict[str, str]) -> float:
    """CIDEr-D on word tokens without the Java tokenizer (cheap enough to repeat per phrasing)."""
    from pycocoevalcap.cider.cider import Cider

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


def _summed_loss(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """(loss x supervised tokens, supervised tokens) of a batch; rows without an image are run
    without visual prompts (the collated zero image stands in for none, METHOD.md section 3)."""
    import torch

    has_image = batch["has_image"]
    if batch["images"] is None:
        groups = [(torch.ones(len(batch["ids"]), dtype=torch.bool), None)]
    else:
        groups = [(has_image, batch["images"][has_image]), (~has_image, None)]
    total, tokens = 0.0, 0
    for rows, images in groups:
        if not bool(rows.any()):
            continue
        labels = batch["labels"][rows]
        count = int((labels[:, 1:] != -100).sum())
        output = model(batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                       labels=labels, images=images)
        total, tokens = total + float(output.loss) * count, tokens + count
    return total, tokens


def holdout_losses(model: Any, tokenizer: Any, cfg: Config) -> dict[str, float]:
    """Token-weighted mean loss over each task's whole held-out split."""
    import torch

    from llama_adapter_v2.data.shards import make_loader

    limits = {"caption": cfg.training.max_tokens_caption, "instruction": cfg.training.max_tokens_instruction}
    losses: dict[str, float] = {}
    for task in TASKS:
        total, tokens = 0.0, 0
        loader = make_loader(
            holdout_dir(cfg, task), tokenizer=tokenizer, batch_size=cfg.training.batch_size,
            max_tokens=limits[task], image_transform=model.image_transform, seed=cfg.training.seed, epoch=0,
        )
        with torch.no_grad():
            for batch in loader:
                batch_total, batch_tokens = _summed_loss(model, batch)
                total, tokens = total + batch_total, tokens + batch_tokens
        losses[f"{task}_loss"] = total / max(tokens, 1)
    return losses


def evaluate_choice_files(model: Any, tokenizer: Any, files: Sequence[Path]) -> dict[str, float]:
    from llama_adapter_v2.evaluate.multiple_choice import read_choice_items, score_multiple_choice

    metrics: dict[str, float] = {}
    for path in files:
        result = score_multiple_choice(model, tokenizer, read_choice_items(path))
        metrics |= {f"mc_{metric_key(Path(path).stem)}_{metric_key(k)}": v for k, v in result.items()}
    return metrics


def log_to_mlflow(cfg: Config, metrics: dict[str, float], out: Path, run_id: str | None) -> str:
    """Metrics and the eval folder as artifacts, into ``run_id`` or a new run of the experiment."""
    import mlflow

    from llama_adapter_v2.store import ensure_experiment

    experiment_id = ensure_experiment(cfg)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else f"evaluate-{cfg.name}",
    ) as run:
        mlflow.log_metrics({f"eval/{name}": value for name, value in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="eval")
        return run.info.run_id


def evaluate(
    cfg: Config, adapter_dir: Path | str | None, options: EvalOptions | None = None
) -> dict[str, float]:
    """Score ``adapter_dir`` (None: the zero-init model) on the held-out data; write and log the results."""
    import torch

    from llama_adapter_v2.model.build import build_model, load_tokenizer
    from llama_adapter_v2.model.checkpoint import load_adapter

    options = options or EvalOptions()
    out = options.out_dir or cfg.training.output_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    model.eval()
    tokenizer = load_tokenizer(cfg)
    held = load_holdout(cfg, options)
    log.info(
        "evaluating on %d held-out images, %d instruction records", len(held.images), len(held.instructions)
    )
    metrics = holdout_losses(model, tokenizer, cfg)
    metrics |= evaluate_captions(model, tokenizer, held, options, out)
    metrics |= evaluate_instructions(model, tokenizer, held, options, out)
    metrics |= evaluate_choice_files(model, tokenizer, options.choice_files)
    if cfg.data.grounded is not None:
        metrics |= evaluate_grounded(model, tokenizer, cfg.data.grounded, out)
    metrics = {name: float(value) for name, value in sorted(metrics.items())}
    write_json_atomic(out / "metrics.json", metrics)
    (out / "metrics.md").write_text(metrics_table(metrics), encoding="utf-8")
    if options.log_to_mlflow and cfg.tracking.enabled:
        log_to_mlflow(cfg, metrics, out, options.run_id)
    return metrics
