"""Training plots for the MLflow run: loss per task, gate magnitude heatmap, gradient norms.

Drawn with matplotlib's Agg backend (no display) from the run's history, which checkpoints
carry, so a resumed run still plots its whole curve. The same curves are written as CSV data
(``write_curves``), which ``dvc.yaml`` declares as plots: ``dvc plots diff`` overlays them across
revisions, which it cannot do with pictures.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_losses(history: dict[str, list[Any]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    for task in ("caption", "instruction"):
        train = [(s, v) for s, t, v in history["loss"] if t == task]
        held = [(s, v) for s, t, v in history["holdout"] if t == task]
        if train:
            axis.plot(*zip(*train, strict=True), label=f"{task} (train)", alpha=0.7)
        if held:
            axis.plot(*zip(*held, strict=True), "o-", label=f"{task} (held out)")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy")
    axis.legend()
    return _save(figure, path)


def plot_gate_heatmap(history: dict[str, list[Any]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 3))
    rows = history["gates"]
    if rows:
        layers = sorted(rows[0][1])
        values = [[gates[name] for _, gates in rows] for name in layers]
        image = axis.imshow(values, aspect="auto", interpolation="nearest",
                            extent=(rows[0][0], rows[-1][0], len(layers) - 0.5, -0.5))
        axis.set_yticks(range(len(layers)), layers)
        figure.colorbar(image, ax=axis, label="|tanh(gate)|")
    axis.set_xlabel("step")
    return _save(figure, path)


def plot_grad_norms(history: dict[str, list[Any]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    for group in ("visual", "language"):
        points = [(s, v) for s, g, v in history["grad_norm"] if g == group]
        if points:
            axis.plot(*zip(*points, strict=True), label=group)
    axis.set_xlabel("step")
    axis.set_ylabel("gradient norm (before clipping)")
    axis.set_yscale("log")
    axis.legend()
    return _save(figure, path)


def draw_all(history: dict[str, list[Any]], folder: Path) -> list[Path]:
    return [
        plot_losses(history, folder / "loss_per_task.png"),
        plot_gate_heatmap(history, folder / "gate_magnitude.png"),
        plot_grad_norms(history, folder / "grad_norm_per_group.png"),
    ]


def _write_csv(path: Path, column: str, points: list[tuple[int, float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", column])
        writer.writerows((int(step), f"{float(value):.6g}") for step, value in points)
    return path


def write_curves(history: dict[str, list[Any]], folder: Path) -> list[Path]:
    """One CSV per curve (step, value): loss per task on training and held-out data, gradient
    norm per parameter group."""
    written = []
    for task in ("caption", "instruction"):
        for split, key in (("train", "loss"), ("holdout", "holdout")):
            points = [(step, value) for step, name, value in history[key] if name == task]
            written.append(_write_csv(folder / f"loss_{task}_{split}.csv", "loss", points))
    for group in ("visual", "language"):
        points = [(step, value) for step, name, value in history["grad_norm"] if name == group]
        written.append(_write_csv(folder / f"grad_norm_{group}.csv", "grad_norm", points))
    return written
