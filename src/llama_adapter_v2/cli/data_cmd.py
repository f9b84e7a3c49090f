"""``lav2 data``: generate the demo data, then prepare -> validate -> shard (the DVC stages)."""

from __future__ import annotations

from pathlib import Path

import typer

from llama_adapter_v2.cli.config_cmd import ConfigFile, Overrides, load_or_exit

app = typer.Typer(help="Demo data, reading, validation (great-expectations) and webdataset shards.")


@app.command("demo")
def demo(config: ConfigFile, overrides: Overrides = None) -> None:
    """Generate the demo data set where CONFIG's data sources point (deterministic for data.demo.seed)."""
    from llama_adapter_v2.data.demo import generate_demo

    cfg = load_or_exit(config, overrides)
    counts = generate_demo(cfg.data)
    typer.echo("demo data written: " + ", ".join(f"{n} {what}" for what, n in counts.items()))


def _root(config: Path) -> Path:
    from llama_adapter_v2.config.loader import project_root_of

    return project_root_of(config)


@app.command("prepare")
def prepare(config: ConfigFile, overrides: Overrides = None) -> None:
    """Read every source of CONFIG into <work_dir>/prepared/{captions,instructions}.jsonl."""
    from llama_adapter_v2.data import pipeline
    from llama_adapter_v2.data.readers import DataFormatError

    cfg = load_or_exit(config, overrides)
    try:
        counts = pipeline.prepare(cfg, _root(config))
    except DataFormatError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo("prepared: " + ", ".join(f"{n} {kind} records" for kind, n in counts.items()))


@app.command("validate")
def validate(config: ConfigFile, overrides: Overrides = None) -> None:
    """Run the great-expectations suites; clean records go on, failing ones to the quarantine."""
    from llama_adapter_v2.data import pipeline
    from llama_adapter_v2.data.validation import ValidationStoppedError

    cfg = load_or_exit(config, overrides)
    try:
        summary = pipeline.validate(cfg, _root(config))
    except ValidationStoppedError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    for kind in pipeline.KINDS:
        counts = summary[kind]
        typer.echo(f"{kind}: {counts['input']} in, {counts['clean']} clean, "
                   f"{counts['quarantined']} quarantined")
    typer.echo(f"report: {summary['report']}")


@app.command("shard")
def shard(config: ConfigFile, overrides: Overrides = None) -> None:
    """Write train/holdout webdataset shards of the validated records."""
    from llama_adapter_v2.data import pipeline

    cfg = load_or_exit(config, overrides)
    counts = pipeline.shard(cfg, _root(config))
    for kind, splits in counts.items():
        typer.echo(f"{kind}: " + ", ".join(f"{n} {split}" for split, n in splits.items()))
