"""``lav2 ablate``: train and evaluate each ablation variant over several seeds; table, chart, MLflow."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llama_adapter_v2.cli.config_cmd import ConfigFile, Overrides, load_or_exit

DEFAULT_VARIANTS = Path("configs/ablations/variants.yaml")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"give one or more distinct seeds, got {text!r}")
    return seeds


def _one_run(config: Path, overrides: list[str], folder: Path, first_steps: int) -> dict[str, float]:
    """Train one variant at one seed in ``folder`` (afresh) and evaluate it there."""
    from llama_adapter_v2.evaluate.ablations import early_losses, initial_losses  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.evaluate.run import EvalOptions, evaluate  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.train.loop import train  # noqa: PLC0415 - lazy, as above

    shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time, not a resume
    cfg = load_or_exit(config, [*overrides, f"training.output_dir={folder}"])
    started = time.perf_counter()
    result = train(cfg)
    metrics = evaluate(cfg, result.adapter_dir, EvalOptions(out_dir=folder / "eval", log_to_mlflow=False))
    return {**metrics, **early_losses(result.losses, first_steps), **initial_losses(result.final_metrics),
            "seconds": time.perf_counter() - started}


def _log_to_mlflow(config: Path, overrides: list[str], out: Path, summary: dict[str, Any]) -> str | None:
    """One MLflow run holding the summary (mean and std per variant and metric), table and chart."""
    import mlflow  # noqa: PLC0415 - lazy: CLI starts without MLflow

    from llama_adapter_v2 import store  # noqa: PLC0415 - lazy, as above

    cfg = load_or_exit(config, overrides)
    if not cfg.tracking.enabled:
        return None
    experiment_id = store.ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ablate-{cfg.name}") as run:
        for variant, metrics in summary.items():
            for name, spread in metrics.items():
                mlflow.log_metric(f"{variant}/{name}_mean", spread["mean"])
                mlflow.log_metric(f"{variant}/{name}_std", spread["std"])
        for name in ("ablations.json", "ablations.md", "ablations.png"):
            mlflow.log_artifact(str(out / name))
        return run.info.run_id


def ablate(
    config: ConfigFile,
    *,
    overrides: Overrides = None,
    variants_file: Annotated[
        Path, typer.Option("--variants", exists=True, dir_okay=False)
    ] = DEFAULT_VARIANTS,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just these variants")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="training seeds, comma-separated")] = "0,1,2",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="override training.steps")] = None,
    first_steps: Annotated[int, typer.Option("--first-steps", min=1, help="window for early loss")] = 20,
    out: Annotated[Path, typer.Option("--out", help="one folder per variant and seed")] = Path(
        "artifacts/ablations"
    ),
    chart: Annotated[Path | None, typer.Option("--chart", help="also copy the chart here")] = None,
) -> None:
    """Train + evaluate every variant over SEEDS on CONFIG (and the zero-init model): mean ± std."""
    from llama_adapter_v2.evaluate.ablations import (  # noqa: PLC0415 - lazy: CLI starts without torch
        ZERO_INIT,
        ablation_chart,
        ablation_table,
        read_variants,
        spread_over_seeds,
    )
    from llama_adapter_v2.evaluate.report import write_json_atomic  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.evaluate.run import EvalOptions, evaluate  # noqa: PLC0415 - lazy, as above

    chosen_seeds = _parse_seeds(seeds)
    every = read_variants(variants_file)
    variants = [v for v in every if not only or v.name in only]
    common = [*(overrides or []), *([f"training.steps={steps}"] if steps else [])]
    runs: dict[str, list[dict[str, float]]] = {}
    for variant in variants:
        for seed in chosen_seeds:
            typer.echo(f"[{variant.name} seed {seed}] {variant.description}", err=True)
            run_overrides = [*common, "tracking.enabled=false", *variant.overrides, f"training.seed={seed}"]
            folder = out / variant.name / f"seed-{seed}"
            runs.setdefault(variant.name, []).append(_one_run(config, run_overrides, folder, first_steps))
            write_json_atomic(out / "runs.json", runs)
    zero_overrides = [*common, "tracking.enabled=false", f"training.output_dir={out / ZERO_INIT}"]
    base_cfg = load_or_exit(config, zero_overrides)
    runs = {ZERO_INIT: [evaluate(base_cfg, None, EvalOptions(out_dir=out / ZERO_INIT / "eval",
                                                               log_to_mlflow=False))], **runs}
    rows = {name: spread_over_seeds(values) for name, values in runs.items()}
    summary = {name: {k: {"mean": s.mean, "std": s.std, "runs": s.runs} for k, s in metrics.items()}
               for name, metrics in rows.items()}
    write_json_atomic(out / "ablations.json", summary)
    table = ablation_table(rows)
    legend = "\n".join(
        f"- `{v.name}`: {v.description} ({', '.join(v.overrides) or 'no overrides'})" for v in variants
    )
    (out / "ablations.md").write_text(f"{table}\n{legend}\n", encoding="utf-8")
    title = f"ablations, mean ± std over seeds {','.join(map(str, chosen_seeds))}"
    picture = ablation_chart(rows, out / "ablations.png", title)
    if chart is not None:
        chart.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, chart)
    run_id = _log_to_mlflow(config, common, out, summary)
    typer.echo(table + "\n" + legend)
    typer.echo(f"written to {out}" + (f"; MLflow run {run_id}" if run_id else ""))
    typer.echo(json.dumps({"seeds": chosen_seeds, "variants": [v.name for v in variants]}))
