"""README's ablation table quotes docs/ablations.json, the summary `lav2 ablate` wrote, cell for cell:
a figure edited by hand, or a table left behind after a new run, fails here."""

from __future__ import annotations

import json
from pathlib import Path

from llama_adapter_v2.evaluate.ablations import Spread, spread_cell

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / "docs" / "ablations.json"
TABLE_HEADER = "| variant (3 seeds, mean ± std) |"
COLUMNS = ("grounded_accuracy", "grounded_accuracy_blind", "grounded_caption_colour", "caption_cider",
           "instruction_exact_match")


def readme_ablation_rows() -> list[list[str]]:
    """The cells after the label of every row of README's ablation table, in order."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")][1:])
    return rows


def test_readme_ablation_table_is_the_committed_summary() -> None:
    summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    rows = readme_ablation_rows()
    assert len(rows) == len(summary), f"README has {len(rows)} ablation rows, {SUMMARY.name} {len(summary)}"
    for (variant, metrics), cells in zip(summary.items(), rows, strict=True):
        quoted = [spread_cell(Spread(**metrics[name])) for name in COLUMNS]
        assert cells == quoted, f"README's row for {variant}"


def test_every_ablated_variant_ran_three_seeds() -> None:
    """A spread over seeds is what the table claims; the zero-init model has no seed and runs once."""
    summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    runs = {variant: metrics["grounded_accuracy"]["runs"] for variant, metrics in summary.items()}
    assert runs.pop("zero-init") == 1
    assert set(runs.values()) == {3}, runs

