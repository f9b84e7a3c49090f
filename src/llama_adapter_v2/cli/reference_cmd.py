"""``lav2 reference``: README's demo figures, rendered from and checked against their reference file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llama_adapter_v2.cli.terminal import errors_exit
from llama_adapter_v2.evaluate.reference import (
    MIN_TOLERANCE,
    ReferenceFileError,
    deviations,
    load_reference,
    measured_reference,
    quoted_metrics,
    with_readme_block,
    write_reference,
)

app = typer.Typer(help="Reference figures (docs/demo-metrics.json): check a run against them, render README.")

ReferenceFile = Annotated[Path, typer.Option(help="metric -> {value, tolerance}")]
DEFAULT_REFERENCE = Path("docs/demo-metrics.json")


@app.command("check")
def check(
    metrics: Annotated[Path, typer.Argument(help="a run's eval/metrics.json")],
    reference: ReferenceFile = DEFAULT_REFERENCE,
) -> None:
    """Exit 1 when a reference figure is missing from METRICS or outside its tolerance."""
    with errors_exit(ReferenceFileError, OSError, json.JSONDecodeError):
        figures = load_reference(reference)
        measured = json.loads(metrics.read_text(encoding="utf-8"))
        if not isinstance(measured, dict):
            raise ReferenceFileError(f"{metrics}: expected a JSON object of metric -> value")
    problems = deviations(measured, figures)
    for line in problems:
        typer.secho(f"{metrics}: {line}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"{metrics}: all {len(figures)} figures of {reference} hold within their tolerance")


@app.command("readme")
def readme(
    path: Annotated[Path, typer.Argument(help="README to rewrite between its demo-metrics markers")] = Path(
        "README.md"),
    reference: ReferenceFile = DEFAULT_REFERENCE,
) -> None:
    """Rewrite README's demo-figures block from the reference file."""
    with errors_exit(ReferenceFileError, OSError):
        text = with_readme_block(path.read_text(encoding="utf-8"), load_reference(reference))
        path.write_text(text, encoding="utf-8")
    typer.echo(f"{path}: demo figures rendered from {reference}")


@app.command("measure")
def measure(
    runs: Annotated[list[Path], typer.Argument(help="two or more runs' eval/metrics.json")],
    out: ReferenceFile = DEFAULT_REFERENCE,
    min_tolerance: Annotated[float, typer.Option(help="the least tolerance of a figure")] = MIN_TOLERANCE,
) -> None:
    """Write the reference figures README quotes: values of the first run, tolerances from the spread."""
    with errors_exit(ReferenceFileError, OSError, json.JSONDecodeError):
        measured = [json.loads(path.read_text(encoding="utf-8")) for path in runs]
        figures = measured_reference(measured, quoted_metrics(), min_tolerance)
        write_reference(out, figures)
    widest = max(figures.items(), key=lambda item: item[1].tolerance)
    typer.echo(f"{out}: {len(figures)} figures from {len(runs)} runs (widest tolerance: {widest[0]} "
               f"+- {widest[1].tolerance})")
