"""Evaluation outputs on disk: JSON written atomically and a markdown table of metrics."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


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
