"""The paper's ablations as data: variants (config overrides), their spread over seeds, table and chart.

Running them needs training and evaluation together, so the runner lives in the CLI layer
(``lav2 ablate``); this module reads the variants file, summarises each variant's runs over
seeds as mean and standard deviation, and turns the summary into a table and a bar chart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
from matplotlib import pyplot

ZERO_INIT = "zero-init"
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grounded_accuracy", "grounded acc."),
    ("grounded_accuracy_blind", "grounded acc., blind"),
    ("grounded_caption_colour", "captions name colour"),
    ("caption_cider", "CIDEr-D"),
    ("caption_meteor", "METEOR"),
    ("instruction_exact_match", "EM (instr)"),
    ("instruction_rouge_l", "ROUGE-L (instr)"),
    ("caption_loss", "held-out loss cap"),
    ("instruction_loss", "held-out loss instr"),
    ("initial_loss_instruction", "held-out loss instr, step 0"),
    ("early_loss_instruction", "train loss instr, first steps"),
)
CHART_METRICS: tuple[tuple[str, str], ...] = (
    ("grounded_accuracy", "grounded accuracy"),
    ("grounded_accuracy_blind", "grounded accuracy, blank image"),
    ("grounded_caption_colour", "captions naming the colour"),
    ("instruction_exact_match", "instruction exact match"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float
    runs: int


def read_variants(path: Path) -> list[Variant]:
    """Variants from a YAML mapping name -> {description, overrides: [key=value, ...]}."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of variant names to {{description, overrides}}")
    variants = []
    for name, body in raw.items():
        if not isinstance(body, dict) or not isinstance(body.get("overrides"), list):
            raise ValueError(f"{path}: variant {name!r} needs a list `overrides` (may be empty)")
        overrides = tuple(str(item) for item in body["overrides"])
        if bad := [item for item in overrides if "=" not in item]:
            raise ValueError(f"{path}: variant {name!r}: overrides must be key=value, got {bad}")
        variants.append(Variant(str(name), str(body.get("description", "")), overrides))
    return variants


def early_losses(losses: Sequence[tuple[int, str, float]], first_steps: int) -> dict[str, float]:
    """Mean training loss per task over the first ``first_steps`` optimizer steps."""
    by_task: dict[str, list[float]] = {}
    for step, task, value in losses:
        if step <= first_steps:
            by_task.setdefault(task, []).append(value)
    return {f"early_loss_{task}": statistics.fmean(values) for task, values in sorted(by_task.items())}


def initial_losses(final_metrics: Mapping[str, float]) -> dict[str, float]:
    """Held-out loss per task before the first step (training's ``holdout_initial/<task>``)."""
    prefix = "holdout_initial/"
    found = {k.removeprefix(prefix): v for k, v in final_metrics.items() if k.startswith(prefix)}
    return {f"initial_loss_{task}": value for task, value in found.items()}


def spread_over_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """Mean and sample standard deviation (0 for one run) of every metric the runs share."""
    shared = set.intersection(*(set(run) for run in runs)) if runs else set()
    result = {}
    for name in sorted(shared):
        values = [float(run[name]) for run in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        result[name] = Spread(statistics.fmean(values), std, len(values))
    return result


def spread_cell(spread: Spread | None) -> str:
    """A table cell: the mean alone for one run, mean ± std over seeds; empty when missing."""
    if spread is None or math.isnan(spread.mean):
        return ""
    return f"{spread.mean:.3f}" if spread.runs == 1 else f"{spread.mean:.3f} ± {spread.std:.3f}"


def ablation_table(rows: Mapping[str, Mapping[str, Spread]]) -> str:
    """Markdown: one row per variant, mean ± std over its seeds for each of ``TABLE_COLUMNS``."""
    header = "| variant | seeds | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 2) + "|"]
    for name, metrics in rows.items():
        runs = max((s.runs for s in metrics.values()), default=0)
        cells = [spread_cell(metrics.get(key)) for key, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_chart(rows: Mapping[str, Mapping[str, Spread]], out: Path, title: str) -> Path:
    """Bars of ``CHART_METRICS`` per variant with one-standard-deviation error bars (PNG)."""
    names = list(rows)
    width = 0.8 / len(CHART_METRICS)
    figure, axes = pyplot.subplots(figsize=(2.0 + 1.6 * len(names), 4.2))
    for index, (key, label) in enumerate(CHART_METRICS):
        means = [rows[n][key].mean if key in rows[n] else 0.0 for n in names]
        errors = [rows[n][key].std if key in rows[n] else 0.0 for n in names]
        positions = [i + (index - (len(CHART_METRICS) - 1) / 2) * width for i in range(len(names))]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=label)
    axes.set_xticks(range(len(names)), names, rotation=15)
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    pyplot.close(figure)
    return out
