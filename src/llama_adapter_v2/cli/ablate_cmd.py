"""``lav2 ablate``: train and evaluate each ablation variant, then write the results table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from llama_adapter_v2.cli.config_cmd import ConfigFile, Overrides, load_or_exit

DEFAULT_VARIANTS = Path("configs/ablations/variants.yaml")


def ablate(
    config: ConfigFile,
    *,
    overrides: Overrides = None,
    variants_file: Annotated[
        Path, typer.Option("--variants", exists=True, dir_okay=False)
    ] = DEFAULT_VARIANTS,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just these variants")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="override training.steps")] = None,
    first_steps: Annotated[int, typer.Option("--first-steps", min=1, help="window for early loss")] = 20,
    out: Annotated[Path, typer.Option("--out", help="one folder per variant")] = Path(
        "artifacts/ablations"
    ),
) -> None:
    """Train + evaluate every variant of VARIANTS on CONFIG and the zero-init model; write the table."""
    from llama_adapter_v2.evaluate.ablations import (  # noqa: PLC0415 - lazy: CLI starts without torch
        ZERO_INIT,
        ablation_table,
        early_losses,
        initial_losses,
        read_variants,
    )
    from llama_adapter_v2.evaluate.report import write_json_atomic  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.evaluate.run import EvalOptions, evaluate  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.train.loop import train  # noqa: PLC0415 - lazy: CLI starts without torch

    every = read_variants(variants_file)
    variants = [v for v in every if not only or v.name in only]
    common = [*(overrides or []), "tracking.enabled=false", *([f"training.steps={steps}"] if steps else [])]
    rows: dict[str, dict[str, float]] = {}
    for variant in variants:
        folder = out / variant.name
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time, not a resume
        cfg = load_or_exit(config, [*common, *variant.overrides, f"training.output_dir={folder}"])
        typer.echo(f"[{variant.name}] {variant.description}: training {cfg.training.steps} steps", err=True)
        started = time.perf_counter()
        result = train(cfg)
        options = EvalOptions(out_dir=folder / "eval", log_to_mlflow=False)
        rows[variant.name] = {
            **evaluate(cfg, result.adapter_dir, options),
            **early_losses(result.losses, first_steps),
            **initial_losses(result.final_metrics),
        }
        rows[variant.name]["seconds"] = time.perf_counter() - started
        if variant.name == every[0].name:  # the reference variant also gets the zero-init row
            zero = evaluate(cfg, None, EvalOptions(out_dir=out / ZERO_INIT / "eval", log_to_mlflow=False))
            rows = {ZERO_INIT: zero, **rows}
        write_json_atomic(out / "ablations.json", rows)
    table = ablation_table(rows)
    legend = "\n".join(
        f"- `{v.name}`: {v.description} ({', '.join(v.overrides) or 'no overrides'})" for v in variants
    )
    (out / "ablations.md").write_text(f"{table}\n{legend}\n", encoding="utf-8")
    typer.echo(table + "\n" + legend)
