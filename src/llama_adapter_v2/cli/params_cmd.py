"""``lav2 params CONFIG``: trainable parameter counts, built on the meta device (no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, errors_exit, load_or_exit


def params(
    config: ConfigFile,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """Count trainable parameters of CONFIG per group and per kind, and the share of the frozen base."""
    from llama_adapter_v2.model import build, trainable  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.model.params import count_parameters  # noqa: PLC0415 - lazy, as above

    cfg = load_or_exit(config, overrides)
    with errors_exit(build.BaseModelError):
        counts = count_parameters(build.build_model(cfg, device="meta"))
    if as_json:
        typer.echo(json.dumps({"config": str(Path(config)), "name": cfg.name, **counts.as_dict()}, indent=2))
        return
    table = Table(title=f"{cfg.name}: trainable parameters")
    table.add_column("kind")
    for group in trainable.GROUPS:
        table.add_column(group, justify="right")
    table.add_column("total", justify="right")
    for kind in trainable.KINDS:
        per_group = (counts.by_group_and_kind[group][kind] for group in trainable.GROUPS)
        table.add_row(kind, *(f"{n:,}" for n in per_group), f"{counts.by_kind[kind]:,}")
    all_groups = (f"{counts.by_group[g]:,}" for g in trainable.GROUPS)
    table.add_row("all", *all_groups, f"{counts.trainable:,}", style="bold")
    console = Console()
    console.print(table)
    console.print(
        f"frozen base {counts.base:,}; trainable {counts.trainable:,} "
        f"= {counts.percent_of_base:.3f} % of it; "
        f"frozen CLIP tower {counts.vision_tower:,}"
    )
