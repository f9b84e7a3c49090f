"""``lav2 register`` and ``lav2 promote``: the model registry from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llama_adapter_v2.cli.config_cmd import ConfigFile, Overrides, load_or_exit

EXIT_REFUSED = 3


def _read_metrics(path: Path | None) -> dict[str, float] | None:
    if path is None or not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {key: float(value) for key, value in raw.items() if isinstance(value, int | float)}


def training_run_id(cfg: object) -> str:
    """The MLflow run of the training that made the adapter; exit 2 when no checkpoint names one."""
    from llama_adapter_v2.train.checkpoint import recorded_run_id

    checkpoints = cfg.training.output_dir / "checkpoints"  # type: ignore[attr-defined]
    run_id = recorded_run_id(checkpoints)
    if run_id is None:
        typer.secho(f"{checkpoints}: no complete checkpoint with an MLflow run id; pass --run-id",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    return run_id


def _decision_line(decision: object) -> str:
    d = decision
    return (f"version {d.version}: {d.outcome} (@{d.alias}: {d.champion_version}) - {d.reason}")  # type: ignore[attr-defined]


def register(  # noqa: PLR0917 - typer maps each parameter to an option
    config: ConfigFile,
    run_id: Annotated[str | None, typer.Option(help="Training run (default: its checkpoint's)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter (default: <output_dir>/adapter)")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Evaluation metrics JSON (none: unevaluated)")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Then run the promotion gate on it")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the version (and decision) as JSON here")] = None,
    overrides: Overrides = None,
) -> None:
    """Register ADAPTER as a new version of the configured model, with provenance and metrics tags."""
    from dataclasses import asdict

    from llama_adapter_v2.registry import promote as run_gate
    from llama_adapter_v2.registry import register as register_version

    cfg = load_or_exit(config, overrides)
    adapter = adapter or cfg.training.output_dir / "adapter"  # type: ignore[attr-defined]
    run_id = run_id or training_run_id(cfg)
    version = register_version(cfg, run_id, adapter, _read_metrics(metrics))  # type: ignore[arg-type]
    typer.echo(f"registered {version.name} version {version.version} (evaluation {version.evaluation})")
    record: dict[str, object] = {"version": asdict(version)}
    if promote:
        decision = run_gate(cfg, version.version)  # type: ignore[arg-type]
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
    """Move the champion alias to VERSION only if it beats the champion; exit 3 when refused."""
    from llama_adapter_v2.registry import promote as run_gate

    decision = run_gate(load_or_exit(config, overrides), version)  # type: ignore[arg-type]
    typer.echo(_decision_line(decision))
    if decision.outcome == "refused":
        raise typer.Exit(code=EXIT_REFUSED)
