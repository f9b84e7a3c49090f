"""Reference figures: README's demo table is rendered from docs/demo-metrics.json, and a run is checked
against it; bad reference files are refused naming the file and the metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_adapter_v2.evaluate.reference import (
    MIN_TOLERANCE,
    ReferenceFigure,
    ReferenceFileError,
    deviations,
    load_reference,
    measured_reference,
    quoted_metrics,
    readme_block,
    with_readme_block,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "demo-metrics.json"
RUNS = REPO / "docs" / "reference-runs"  # the runs it is measured from, first one first


def test_readme_quotes_exactly_the_reference_file() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    reference = load_reference(REFERENCE)
    assert readme_block(reference) in readme
    assert with_readme_block(readme, reference) == readme
    assert set(reference) == set(quoted_metrics())


def test_the_reference_file_is_what_measure_makes_of_the_committed_runs() -> None:
    """No hand-typed figure: `lav2 reference measure docs/reference-runs/*.json` writes it as it is."""
    runs = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(RUNS.glob("*.json"))]
    assert len(runs) >= 3  # two thread counts and another kernel set (docs/reference-runs/README.md)
    assert measured_reference(runs, quoted_metrics(), MIN_TOLERANCE) == load_reference(REFERENCE)


def test_a_figure_holds_within_its_tolerance_only() -> None:
    reference = {"a": ReferenceFigure(0.5, 0.02), "b": ReferenceFigure(1.0, 0.0)}
    assert deviations({"a": 0.52, "b": 1.0}, reference) == []
    outside = deviations({"a": 0.5201, "b": 1.0}, reference)
    assert outside == ["a: measured 0.5201, reference 0.5000 +- 0.0200"]
    assert deviations({"a": float("nan"), "b": 1.0}, reference)[0].startswith("a: measured nan")
    assert deviations({"a": 0.5}, reference) == ["b: not in the measured metrics (reference 1.000)"]
    assert deviations({"a": "0.5", "b": True}, reference) == [
        "a: measured '0.5', reference 0.5000 +- 0.0200", "b: measured True, reference 1.0000 +- 0.0000"]


def test_tolerances_are_the_spread_of_the_runs_with_a_floor() -> None:
    runs = [{"m": 0.40, "n": 1.0}, {"m": 0.43, "n": 1.0}, {"m": 0.38, "n": 1.0}]
    figures = measured_reference(runs, ["m", "n"], min_tolerance=0.01)
    assert figures == {"m": ReferenceFigure(0.4, 0.03), "n": ReferenceFigure(1.0, 0.01)}
    with pytest.raises(ReferenceFileError, match="at least two runs"):
        measured_reference(runs[:1], ["m"], 0.01)
    with pytest.raises(ReferenceFileError, match=r"x: not in the metrics of run\(s\) \[0, 1, 2\]"):
        measured_reference(runs, ["x"], 0.01)


def test_every_run_measured_holds_against_the_rounded_figures() -> None:
    # 2.45943 is stored as 2.4594; the far run is 0.41213 from the true first value but 0.41216 from
    # the stored one: nearest-digit rounding gave 0.4121 and failed the run it came from
    runs = [{"m": 2.45943, "n": 0.5}, {"m": 2.87156, "n": 0.50004}]
    figures = measured_reference(runs, ["m", "n"], min_tolerance=0.0)
    assert figures == {"m": ReferenceFigure(2.4594, 0.4122), "n": ReferenceFigure(0.5, 0.0001)}
    assert all(deviations(run, figures) == [] for run in runs)


def test_a_run_on_the_edge_of_a_figure_is_put_strictly_inside() -> None:
    # 0.656 - 0.566 is 0.09000000000000008 in floats: a tolerance of 0.09 failed a plain check
    runs = [{"m": 0.566, "n": 0.3}, {"m": 0.656, "n": 0.33}, {"m": 0.6, "n": 0.31}]
    figures = measured_reference(runs, ["m", "n"], min_tolerance=0.0)
    assert figures == {"m": ReferenceFigure(0.566, 0.0901), "n": ReferenceFigure(0.3, 0.0301)}
    assert all(abs(run[name] - figures[name].value) < figures[name].tolerance for run in runs for name in run)


@pytest.mark.parametrize("content, message", [
    ("{", "cannot read reference figures"),
    ("[]", "expected a non-empty JSON object"),
    ('{"m": {"value": 1}}', "m: expected exactly the keys 'value' and 'tolerance'"),
    ('{"m": {"value": 1, "tolerance": -0.1}}', "m: value and tolerance must be finite numbers"),
    ('{"m": {"value": NaN, "tolerance": 0.1}}', "m: value and tolerance must be finite numbers"),
    ('{"m": {"value": "0.3", "tolerance": 0.1}}', "m: value and tolerance must be finite numbers"),
])
def test_a_bad_reference_file_names_the_file_and_the_metric(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "ref.json"
    path.write_text(content)
    with pytest.raises(ReferenceFileError, match=message) as caught:
        load_reference(path)
    assert str(path) in str(caught.value)


def _lav2(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llama_adapter_v2.cli.main", "reference", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)


def test_check_exits_1_naming_each_figure_out_of_tolerance(tmp_path: Path) -> None:
    reference = load_reference(REFERENCE)
    metrics = {name: figure.value for name, figure in reference.items()}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(metrics))
    assert _lav2("check", str(good)).returncode == 0
    moved = dict(metrics, grounded_accuracy=metrics["grounded_accuracy"] + 0.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(moved))
    result = _lav2("check", str(bad))
    assert result.returncode == 1
    assert "grounded_accuracy: measured" in result.stderr and "grounded_accuracy_blind" not in result.stderr
    assert _lav2("check", str(tmp_path / "missing.json")).returncode == 2
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    assert "expected a JSON object" in _lav2("check", str(listed)).stderr
