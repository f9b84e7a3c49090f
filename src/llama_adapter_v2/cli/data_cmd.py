"""``lav2 data``: generate the demo data, then prepare -> validate -> shard (the DVC stages).

Each command imports the library when it runs (marked ``lazy``): ``lav2 --help`` starts without
torch and without great-expectations.
"""

from __future__ import annotations

import typer

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, errors_exit, load_or_exit
from llama_adapter_v2.config.loader import project_root_of

app = typer.Typer(help="Demo data, reading, validation (great-expectations) and webdataset shards.")


@app.command("demo")
def demo(config: ConfigFile, overrides: Overrides = None) -> None:
    """Generate the demo data set where CONFIG's data sources point (deterministic for data.demo.seed)."""
    from llama_adapter_v2.data import demo as demo_data  # noqa: PLC0415 - lazy: CLI starts without torch

    cfg = load_or_exit(config, overrides)
    counts = demo_data.generate_demo(cfg.data)
    typer.echo("demo data written: " + ", ".join(f"{n} {what}" for what, n in counts.items()))


@app.command("prepare")
def prepare(config: ConfigFile, overrides: Overrides = None) -> None:
    """Read every source of CONFIG into <work_dir>/prepared/{captions,instructions}.jsonl."""
    from llama_adapter_v2.data import pipeline, readers  # noqa: PLC0415 - lazy: CLI starts without torch

    cfg = load_or_exit(config, overrides)
    with errors_exit(readers.DataFormatError):
        counts = pipeline.prepare(cfg, project_root_of(config))
    typer.echo("prepared: " + ", ".join(f"{n} {kind} records" for kind, n in counts.items()))


@app.command("validate")
def validate(config: ConfigFile, overrides: Overrides = None) -> None:
    """Run the great-expectations suites; clean records go on, failing ones to the quarantine."""
    from llama_adapter_v2.data import pipeline, validation  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.store import data_hash  # noqa: PLC0415 - lazy: CLI starts without MLflow

    cfg = load_or_exit(config, overrides)
    root = project_root_of(config)
    with errors_exit(validation.ValidationStoppedError, code=1):
        summary = pipeline.validate(cfg, root, data_hash(root))
    for kind in pipeline.KINDS:
        counts = summary[kind]
        typer.echo(f"{kind}: {counts['input']} in, {counts['clean']} clean, "
                   f"{counts['quarantined']} quarantined")
    typer.echo(f"Data Docs: {summary['data_docs']}")


@app.command("shard")
def shard(config: ConfigFile, overrides: Overrides = None) -> None:
    """Write train/holdout webdataset shards of the validated records."""
    from llama_adapter_v2.data import pipeline  # noqa: PLC0415 - lazy: CLI starts without torch

    cfg = load_or_exit(config, overrides)
    counts = pipeline.shard(cfg, project_root_of(config))
    for kind, splits in counts.items():
        typer.echo(f"{kind}: " + ", ".join(f"{n} {split}" for split, n in splits.items()))
