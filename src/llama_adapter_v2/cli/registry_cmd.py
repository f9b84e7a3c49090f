"""``lav2 register`` and ``lav2 promote``: the model registry from the command line.

Each command imports the library when it runs (marked ``lazy``): ``lav2 --help`` starts without
torch and MLflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, load_or_exit

if TYPE_CHECKING:
    from llama_adapter_v2.registry.promote import PromotionDecision

EXIT_REFUSED = 3


def _read_metrics(path: Path | None) -> dict[str, float] | None:
    if path is None or not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {key: float(value) for key, value in raw.items() if isinstance(value, int | float)}


def _decision_line(d: PromotionDecision) -> str:
    return f"version {d.version}: {d.outcome} (@{d.alias}: {d.champion_version}) - {d.reason}"


def register(  # noqa: PLR0917 - typer maps each parameter to an option
    config: ConfigFile,
    run_id: Annotated[str | None, typer.Option(help="Training run (default: its checkpoint's)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter (default: <output_dir>/adapter)")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Evaluation metrics JSON (none: unevaluated)")] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False,
                     help="The zero-init model's metrics JSON (lav2 evaluate --zero-init): the baseline"),
    ] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Then run the promotion gate on it")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the version (and decision) as JSON here")] = None,
    overrides: Overrides = None,
) -> None:
    """Register ADAPTER as a new version of the configured model, with provenance and metrics tags."""
    from llama_adapter_v2 import registry  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.train import checkpoint  # noqa: PLC0415 - lazy, as above

    cfg = load_or_exit(config, overrides)
    adapter = adapter or cfg.training.output_dir / "adapter"
    checkpoints = cfg.training.output_dir / "checkpoints"
    run_id = run_id or checkpoint.recorded_run_id(checkpoints)
    if run_id is None:
        typer.secho(f"{checkpoints}: no complete checkpoint with an MLflow run id; pass --run-id",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    version = registry.register(cfg, run_id, adapter,
                                registry.with_baseline(_read_metrics(metrics), _read_metrics(baseline)))
    typer.echo(f"registered {version.name} version {version.version} (evaluation {version.evaluation})")
    record: dict[str, object] = {"version": asdict(version)}
    if promote:
        decision = registry.promote(cfg, version.version)
        typer.echo(_decision_line(decision))
        record["promotion"] = asdict(decision)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def promote(
    config: ConfigFile,
    version: Annotated[str, typer.Argument(help="Registered model version to consider")],
    overrides: Overrides = None,
) -> None:
    """Move the champion alias to VERSION only if it beats its baseline and the champion (exit 3: refused)."""
    from llama_adapter_v2 import registry  # noqa: PLC0415 - lazy: CLI starts without torch

    decision = registry.promote(load_or_exit(config, overrides), version)
    typer.echo(_decision_line(decision))
    if decision.outcome == "refused":
        raise typer.Exit(code=EXIT_REFUSED)
