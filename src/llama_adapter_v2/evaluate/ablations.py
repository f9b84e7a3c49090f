"""The paper's ablations as data: variants (config overrides) and the table of their results.

Running them needs training and evaluation together, so the runner lives in the CLI layer
(``lav2 ablate``); this module reads the variants file and turns results into a table.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ZERO_INIT = "zero-init"
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("caption_cider", "CIDEr-D"),
    ("caption_bleu_4", "BLEU-4"),
    ("caption_meteor", "METEOR"),
    ("caption_rouge_l", "ROUGE-L (cap)"),
    ("instruction_exact_match", "EM (instr)"),
    ("instruction_rouge_l", "ROUGE-L (instr)"),
    ("initial_loss_caption", "held-out loss cap, step 0"),
    ("initial_loss_instruction", "held-out loss instr, step 0"),
    ("caption_loss", "held-out loss cap"),
    ("instruction_loss", "held-out loss instr"),
    ("early_loss_caption", "train loss cap, first steps"),
    ("early_loss_instruction", "train loss instr, first steps"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...]


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


def ablation_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown: one row per variant, the columns of ``TABLE_COLUMNS`` (blank where absent)."""
    header = "| variant | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[key]:.3f}" if key in metrics else "" for key, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
