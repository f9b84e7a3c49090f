"""``lav2 data``: generate the demo data, then prepare -> validate -> shard (the DVC stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
