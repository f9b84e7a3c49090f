"""The evaluation run: held-out captions and instructions, optional multiple-choice files.

``evaluate(cfg, adapter_dir)`` generates a caption per held-out image and an answer per held-out
instruction record, scores them (COCO caption metrics; exact match and ROUGE-L per task), adds
the held-out losses, the caption metric's spread over several phrasings of the caption
instruction (MultiInstruct's sensitivity) and any MMLU-layout files, and writes flat metrics
to ``<training.output_dir>/eval/metrics.json`` (DVC metrics) beside per-sample outputs and a
markdown table; with tracking on, the same go to an MLflow run of their own (a child of the
training run). ``adapter_dir=None`` evaluates the
zero-init model (the frozen base), the baseline a trained adapter must beat. Generating and
scoring are ``scoring``'s; the model comes from ``infer``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
import torch

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.evaluate.grounded import CAPTION_WORD_GROUPS, evaluate_grounded
from llama_adapter_v2.evaluate.heldout import load_holdout
from llama_adapter_v2.evaluate.options import EvalOptions
from llama_adapter_v2.evaluate.report import metrics_table, write_json_atomic
from llama_adapter_v2.evaluate.scoring import (
    evaluate_captions,
    evaluate_choice_files,
    evaluate_instructions,
    holdout_losses,
)
from llama_adapter_v2.infer.holdout import image_control_losses
from llama_adapter_v2.infer.loading import inference_model
from llama_adapter_v2.model.build import load_tokenizer
from llama_adapter_v2.store import STAGE_TAG, TRAINING_RUN_TAG, ensure_experiment

log = logging.getLogger(__name__)

__all__ = ["EvalOptions", "eval_dir", "evaluate", "log_to_mlflow"]


def eval_dir(cfg: Config, zero_init: bool = False) -> Path:
    """Where an evaluation is written by default: the trained adapter's and the zero-init baseline's
    never share a folder, so scoring the baseline cannot overwrite the model's figures."""
    return cfg.training.output_dir / ("eval-zero-init" if zero_init else "eval")


def log_to_mlflow(cfg: Config, metrics: dict[str, float], out: Path, training_run_id: str | None,
                  stage: str = "evaluate") -> str:
    """Metrics and the eval folder as artifacts, in a run of their own: a child of the training run
    when there is one (MLflow nests it there), so evaluating never changes the training run. The
    zero-init baseline (``stage="baseline"``) belongs to no training run."""
    experiment_id = ensure_experiment(cfg)
    tags = {STAGE_TAG: stage, "mlflow.source.name": "lav2 evaluate"}
    if training_run_id and stage == "evaluate":
        tags |= {"mlflow.parentRunId": training_run_id, TRAINING_RUN_TAG: training_run_id}
    prefix = "baseline-zero-init" if stage == "baseline" else "evaluate"
    run_name = f"{prefix}-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_metrics({f"eval/{name}": value for name, value in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="eval")
        return run.info.run_id


def evaluate(
    cfg: Config, adapter_dir: Path | str | None, options: EvalOptions | None = None
) -> dict[str, float]:
    """Score ``adapter_dir`` (None: the zero-init model) on the held-out data; write and log the results."""
    options = options or EvalOptions()
    out = options.out_dir or eval_dir(cfg, zero_init=adapter_dir is None)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.training.seed)  # the zero-init model's prompts are drawn from it
    model = inference_model(cfg, adapter_dir)
    tokenizer = load_tokenizer(cfg)
    held = load_holdout(cfg, options)
    log.info(
        "evaluating on %d held-out images, %d instruction records", len(held.images), len(held.instructions)
    )
    metrics = holdout_losses(model, tokenizer, cfg)
    word_groups = CAPTION_WORD_GROUPS if cfg.data.grounded is not None else {}
    device = next(model.parameters()).device
    metrics |= image_control_losses(model, tokenizer, cfg, word_groups, device=device)
    metrics |= evaluate_captions(model, tokenizer, held, options, out)
    metrics |= evaluate_instructions(model, tokenizer, held, options, out)
    metrics |= evaluate_choice_files(model, tokenizer, options.choice_files)
    if cfg.data.grounded is not None:
        metrics |= evaluate_grounded(model, tokenizer, cfg.data.grounded, out)
    metrics = {name: float(value) for name, value in sorted(metrics.items())}
    write_json_atomic(out / "metrics.json", metrics)
    (out / "metrics.md").write_text(metrics_table(metrics), encoding="utf-8")
    if options.log_to_mlflow and cfg.tracking.enabled:
        log_to_mlflow(cfg, metrics, out, options.run_id, stage="evaluate" if adapter_dir else "baseline")
    return metrics
