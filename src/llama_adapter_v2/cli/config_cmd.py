"""``lav2 config``: check and show configs without importing torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, load_or_exit
from llama_adapter_v2.config import resolved_llama_arch

app = typer.Typer(help="Validate and show configs (no torch import; runs in well under a second).")


@app.command("check")
def check(config: ConfigFile, overrides: Overrides = None) -> None:
    """Validate CONFIG: unknown keys, types, impossible values, local checkpoint shapes."""
    cfg = load_or_exit(config, overrides)
    arch = resolved_llama_arch(cfg)
    adapter = cfg.model.adapter
    typer.echo(
        f"{config}: ok ({cfg.name}: {arch.num_hidden_layers} layers x {arch.hidden_size}, "
        f"prompts in the last {adapter.resolved_prompt_layers(arch.num_hidden_layers)} layers, "
        f"{adapter.visual_fusion} visual fusion)"
    )
    for label, path in (("base", cfg.model.base.path), ("vision", cfg.model.vision.path)):
        if path is not None and not path.exists():
            typer.echo(f"  note: {label} folder {path} is not present here; its `arch` stands in")


@app.command("show")
def show(
    config: ConfigFile,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout")] = None,
) -> None:
    """Print the resolved CONFIG: defaults filled in, paths absolute."""
    cfg = load_or_exit(config, overrides)
    data = cfg.model_dump(mode="json")
    text = json.dumps(data, indent=2) + "\n" if as_json else yaml.safe_dump(data, sort_keys=False)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
