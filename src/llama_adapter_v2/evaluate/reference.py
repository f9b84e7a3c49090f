"""Reference figures: the demo's metrics as README quotes them, each with the tolerance it holds to.

``docs/demo-metrics.json`` maps a metric of ``eval/metrics.json`` to ``{"value": v, "tolerance": t}``.
README's table is rendered from that file (never typed by hand), and ``make demo`` checks its own
run against it, so a figure README quotes is one that the README's command gives, within ``t``.
Tolerances come from runs that differ only in how CPU kernels add up (thread counts, processors):
greedy answers flip where two tokens are nearly tied, and one flipped answer moves an accuracy
over 100 questions by 0.01.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

README_START = "<!-- demo-metrics:start (rendered from docs/demo-metrics.json by `lav2 reference readme`) -->"
README_END = "<!-- demo-metrics:end -->"
ATTRIBUTES = (("count", "count (one or two shapes)"), ("place", "place"), ("shape", "shape"),
              ("background", "background colour"), ("colour", "shape colour"))
OTHER_METRICS = (("caption_cider", "caption CIDEr-D"), ("caption_meteor", "METEOR"),
                 ("instruction_exact_match", "instruction exact match"),
                 ("caption_loss", "held-out loss (captions)"),
                 ("caption_loss_shuffled_image", "the same with every caption given another image"),
                 ("caption_loss_colour_words", "on the words that name a shape's colour"),
                 ("caption_loss_colour_words_shuffled_image", "the same with another image"),
                 ("instruction_loss", "held-out loss (instructions)"),
                 ("grounded_caption_shape", "captions of one-shape drawings naming the drawn shape"),
                 ("grounded_caption_shape_blind", "the same with a blank image"),
                 ("grounded_caption_colour", "naming the drawn colour"),
                 ("grounded_caption_colour_blind", "the same with a blank image"))
GROUNDED_COLUMNS = (
    "grounded_accuracy", "grounded_accuracy_blind", "grounded_accuracy_text", "grounded_chance"
)
# The least tolerance of a figure. Two machines' default-thread runs differed by exactly 0.01 (one
# answer in 100) on three grounded accuracies, so a floor of one answer would fail a third machine
# that flips one more; two answers is the floor.
MIN_TOLERANCE = 0.02


def _is_number(value: object) -> bool:
    """JSON numbers only: ``True`` is an int to Python but not a metric."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class ReferenceFileError(ValueError):
    """A reference file that cannot be read as ``{metric: {"value": v, "tolerance": t}}``."""


@dataclass(frozen=True)
class ReferenceFigure:
    value: float
    tolerance: float

    def holds(self, measured: object) -> bool:
        """A finite number within tolerance; the 1e-9 absorbs float representation error at the
        boundary (values are stored to 4 digits, tolerances are at least that coarse)."""
        if not _is_number(measured):
            return False
        return math.isfinite(measured) and abs(measured - self.value) <= self.tolerance + 1e-9


def load_reference(path: Path) -> dict[str, ReferenceFigure]:
    """The file's figures; a bad entry names the file, the metric and what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ReferenceFileError(f"{path}: cannot read reference figures: {error}") from error
    if not isinstance(raw, dict) or not raw:
        raise ReferenceFileError(f"{path}: expected a non-empty JSON object of "
                                 "metric -> {value, tolerance}")
    figures = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"value", "tolerance"}:
            raise ReferenceFileError(f"{path}: {name}: expected exactly the keys 'value' and 'tolerance'")
        value, tolerance = entry["value"], entry["tolerance"]
        finite = all(_is_number(x) and math.isfinite(x) for x in (value, tolerance))
        if not finite or tolerance < 0:
            raise ReferenceFileError(f"{path}: {name}: value and tolerance must be finite numbers, "
                                 f"tolerance at least 0; got {value!r}, {tolerance!r}")
        figures[name] = ReferenceFigure(float(value), float(tolerance))
    return figures


def quoted_metrics() -> list[str]:
    """Every metric README's block quotes."""
    grounded = [f"{column}_{key}" for column in GROUNDED_COLUMNS for key, _ in ATTRIBUTES]
    return sorted([*grounded, *GROUNDED_COLUMNS, *(name for name, _ in OTHER_METRICS)])


def measured_reference(runs: list[dict[str, float]], names: list[str], min_tolerance: float
                       ) -> dict[str, ReferenceFigure]:
    """Figures from repeated runs: the first run's value, the largest distance of another run from it
    as tolerance (at least ``min_tolerance``: runs on one machine may agree where other CPUs do not).

    The distances are taken from the stored (4-digit) value and rounded up, so every run the
    figures were measured from holds against them; rounding both halves to the nearest digit left
    the farthest run up to 1e-4 outside. A run exactly on the edge (0.656 against 0.566 ± 0.09 is
    0.09000000000000008 away in floats) gets one step more, so it is inside by any reader's check."""
    if len(runs) < 2:
        raise ReferenceFileError("measuring tolerances needs at least two runs' metrics")
    figures = {}
    for name in names:
        missing = [index for index, run in enumerate(runs) if name not in run]
        if missing:
            raise ReferenceFileError(f"{name}: not in the metrics of run(s) {missing}")
        value = round(runs[0][name], 4)
        spread = max(abs(run[name] - value) for run in runs)
        tolerance = _round_up(max(spread, min_tolerance))
        if spread >= tolerance:  # a run on the edge holds or not by float noise: one step puts it inside
            tolerance = round(tolerance + 1e-4, 4)
        figures[name] = ReferenceFigure(value, tolerance)
    return figures


def _round_up(tolerance: float, digits: int = 4) -> float:
    """Up to ``digits`` decimals, ignoring float noise below 1e-6 of a step (0.03 stays 0.03)."""
    scale = 10**digits
    return math.ceil(tolerance * scale - 1e-6) / scale


def write_reference(path: Path, figures: dict[str, ReferenceFigure]) -> None:
    document = {name: {"value": f.value, "tolerance": f.tolerance} for name, f in sorted(figures.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def deviations(measured: dict[str, object], reference: dict[str, ReferenceFigure]) -> list[str]:
    """One line per reference figure that the measured metrics miss or fall outside of (a value
    that is not a number is outside)."""
    lines = []
    for name, figure in sorted(reference.items()):
        if name not in measured:
            lines.append(f"{name}: not in the measured metrics (reference {figure.value:.3f})")
        elif not figure.holds(value := measured[name]):
            shown = f"{value:.4f}" if _is_number(value) else repr(value)
            lines.append(f"{name}: measured {shown}, reference {figure.value:.4f} +- {figure.tolerance:.4f}")
    return lines


def _cell(reference: dict[str, ReferenceFigure], name: str) -> str:
    if name not in reference:
        raise ReferenceFileError(f"README's table needs {name!r} in the reference figures")
    figure = reference[name]
    return f"{figure.value:.2f} ± {figure.tolerance:.2f}" if figure.tolerance else f"{figure.value:.2f}"


def readme_block(reference: dict[str, ReferenceFigure]) -> str:
    """README's demo-figures block: the grounded table (image, blank image, the scene in words,
    chance) and the rest."""
    rows = ["| attribute | with the image | blank image | scene in words, no image | chance |",
            "|---|---|---|---|---|"]
    for key, label in ATTRIBUTES:
        cells = [_cell(reference, f"{column}_{key}") for column in GROUNDED_COLUMNS]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    means = [_cell(reference, column) for column in GROUNDED_COLUMNS]
    rows.append(f"| mean (`grounded_accuracy`) | {' | '.join(means)} |")
    other = ", ".join(f"{label} {_cell(reference, name)}" for name, label in OTHER_METRICS)
    return "\n".join([README_START, "", *rows, "", f"Other metrics: {other}.", "", README_END])


def with_readme_block(readme: str, reference: dict[str, ReferenceFigure]) -> str:
    """``readme`` with the text between the markers replaced by the rendered block."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ReferenceFileError(f"README has no block between {README_START!r} and {README_END!r}")
    return readme[:start] + readme_block(reference) + readme[end + len(README_END):]
