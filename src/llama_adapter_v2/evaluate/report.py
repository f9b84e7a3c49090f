"""Evaluation outputs on disk: JSON written atomically and a markdown table of metrics."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from llama_adapter_v2.data.records import Kind

# The figures a person reads first after a run (the gate's metric goes before them).
HEADLINE_METRICS = (
    "grounded_accuracy", "grounded_accuracy_blind", "caption_cider", "caption_bleu_4",
    "instruction_rouge_l", "instruction_exact_match",
)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON to a temporary sibling, then rename: readers (DVC, MLflow) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A two-column markdown table, one metric per row, sorted by name."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def against_baseline(
    metrics: Mapping[str, float], baseline: Mapping[str, float], names: Sequence[str]
) -> str:
    """The named metrics of a model beside the zero-init baseline's, as a markdown table."""
    lines = ["| metric | this model | zero-init baseline | change |", "|---|---|---|---|"]
    for name in names:
        if name in metrics:
            before = baseline.get(name)
            change = "" if before is None else f"{metrics[name] - before:+.4f}"
            shown = "" if before is None else f"{before:.4f}"
            lines.append(f"| {name} | {metrics[name]:.4f} | {shown} | {change} |")
    return "\n".join(lines) + "\n"


COUNTED = ("input", "clean", "quarantined", "duplicates")  # of validation-metrics.json, per kind


def _count(value: float) -> str:
    """A count as a whole number (``:g`` would print a million as ``1e+06``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def pipeline_report(*, validation: Mapping[str, float], metrics: Mapping[str, float],
                    baseline: Mapping[str, float], names: Sequence[str], decision: Mapping[str, Any],
                    version: Mapping[str, str], data_hash: str, run_link: str,
                    data_docs: str | None = None) -> str:
    """One pipeline run in markdown: what was validated, how the model scored, what the gate decided."""
    counts = ["| kind | input | clean | quarantined | duplicates |", "|---|---|---|---|---|"]
    for kind in get_args(Kind):
        if f"{kind}_input" in validation:
            cells = [kind, *(_count(validation.get(f"{kind}_{key}", 0)) for key in COUNTED)]
            counts.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"# {version['name']} version {version['version']}: {decision['outcome']}",
        "", f"**Promotion.** {decision['reason']}", "",
        f"Data `{data_hash}`; training run: [{run_link}]({run_link})", "",
        "## Data validation", "", *counts, "",
        *([f"great-expectations Data Docs: [{data_docs}]({data_docs}) (also the training run's "
           "`data_docs` artifacts)", ""] if data_docs else []),
        "## Held-out scores against the zero-init baseline", "",
        against_baseline(metrics, baseline, names),
    ])
