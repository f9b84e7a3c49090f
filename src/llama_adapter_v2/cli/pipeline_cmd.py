"""``lav2 pipeline CONFIG``: the Prefect pipeline flow, here, with a local Prefect.

The flow lives in ``flows/pipeline.py`` of the checkout (the library never imports flows/);
it is loaded the way a Prefect worker loads a deployment's entrypoint. Without
``PREFECT_API_URL`` Prefect starts a temporary local server whose database stays under
``PREFECT_HOME`` (``.prefect/``), so ``prefect server start`` shows the runs afterwards. The flow
runs dvc.yaml's stages through ``dvc repro``; ``--set`` overrides are written into the config
file first (DVC reads the file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, load_or_exit
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.evaluate.report import HEADLINE_METRICS

ENTRYPOINT = "flows/pipeline.py:pipeline"


def summary_lines(summary: dict[str, Any], wall_seconds: float) -> list[str]:
    """What a person needs after the demo: the version, its alias, the numbers, where to look."""
    version, decision, metrics = summary["version"], summary["promotion"], summary["metrics"]
    headline = [name for name in (decision["metric"], *HEADLINE_METRICS) if name in metrics]
    alias = f"@{decision['alias']}" if decision["outcome"] == "promoted" else "(alias unchanged)"
    return [
        f"registered model  {version['name']} version {version['version']} {alias}",
        f"promotion         {decision['outcome']}: {decision['reason']}",
        f"data hash         {summary['data_hash']}",
        f"stages run        {', '.join(summary['stages_run']) or 'none (dvc.lock matched every stage)'}",
        f"training          MLflow run {summary['train']['run_id']}",
        "metrics           " + ", ".join(f"{name}={metrics[name]:.4g}" for name in dict.fromkeys(headline)),
        f"all metrics       {summary['metrics_file']} ({len(metrics)} values)",
        f"wall time         {wall_seconds:.1f} s",
        f"MLflow UI         .venv/bin/mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000",
        "Prefect UI        PREFECT_HOME=.prefect .venv/bin/prefect server start --port 4200",
    ]


def pipeline(config: ConfigFile, overrides: Overrides = None) -> None:
    """Run dvc.yaml's stages through DVC (prepare ... register) and print a summary."""
    load_or_exit(config, overrides)  # a bad config fails here, before Prefect starts
    from prefect.flows import load_flow_from_entrypoint  # noqa: PLC0415 - lazy: CLI starts without Prefect (2 s)

    root = project_root()
    os.chdir(root)
    flow = load_flow_from_entrypoint(str(root / ENTRYPOINT))
    started = time.perf_counter()
    summary = flow(config_path=str(Path(config).resolve()), overrides=list(overrides or []))
    seconds = time.perf_counter() - started
    typer.echo("\n".join(summary_lines(summary, seconds)))  # type: ignore[arg-type]
