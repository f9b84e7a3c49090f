"""What Prefect and MLflow add to training: the train flow against the bare loop, same steps.

Both sides run the library's ``train`` on the demo config with the same data, base model and
step count. The bare side turns MLflow off (``tracking.enabled=false``) and calls ``train``
directly; the pipeline side calls the Prefect ``train`` flow of ``flows/pipeline.py`` with
MLflow on (a sqlite store, system metrics, artifacts). One untimed flow run first pays the
one-off costs (Prefect's temporary server and database, MLflow's migrations); those are
reported apart, as ``cold_start_s``. Everything is written under ``artifacts/bench/``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.spec import Spec

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"


def scratch_dir(spec: Spec) -> Path:
    return REPO / "artifacts" / "bench" / f"orchestration-{spec.preset}"


def shared_overrides(scratch: Path, steps: int) -> list[str]:
    """Data, base, tracking and Prefect state of the benchmark, apart from the project's own."""
    return [
        f"data.work_dir={scratch / 'data'}",
        f"model.base.path={scratch / 'demo-base'}",
        f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}",
        f"tracking.artifact_root={scratch / 'mlflow-artifacts'}",
        f"training.steps={steps}",
        f"training.eval_every_steps={steps}",
        f"training.checkpoint.every_steps={steps}",
        # A few base steps suffice: the overhead does not depend on what the base has learned.
        "training.demo_base.steps=5",
    ]


def prepare_inputs(scratch: Path, overrides: list[str]) -> None:
    """Shards and the demo base, once per scratch folder (untimed; the same for both sides)."""
    from llama_adapter_v2.config import load_config
    from llama_adapter_v2.data.pipeline import prepare, shard, validate
    from llama_adapter_v2.train.demo_base import train_demo_base

    cfg = load_config(REPO / CONFIG, overrides)
    if not (scratch / "data" / "shard-done").is_file():
        prepare(cfg, REPO)
        validate(cfg, REPO)
        shard(cfg, REPO)
        (scratch / "data" / "shard-done").touch()
    if not (scratch / "demo-base" / "config.json").is_file():
        train_demo_base(cfg)


def bare_seconds(overrides: list[str], out: Path) -> float:
    from llama_adapter_v2.config import load_config
    from llama_adapter_v2.train.loop import train

    cfg = load_config(REPO / CONFIG, [*overrides, "tracking.enabled=false", f"training.output_dir={out}"])
    started = time.perf_counter()
    train(cfg)
    return time.perf_counter() - started


def pipeline_seconds(overrides: list[str], out: Path) -> float:
    from flows.pipeline import train_flow

    started = time.perf_counter()
    train_flow(CONFIG, [*overrides, f"training.output_dir={out}"])
    return time.perf_counter() - started


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def orchestration_overhead(spec: Spec) -> dict[str, Any]:
    """Alternating bare / pipeline training runs; the overhead is the ratio of their medians."""
    work = spec.workload
    scratch = scratch_dir(spec)
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")  # before prefect is imported: its own database
    measure.configure(work.threads, work.device)
    rss_before = measure.rss_after_imports("llama_adapter_v2.config")
    steps = work.orchestration_steps
    overrides = shared_overrides(scratch, steps)
    prepare_inputs(scratch, overrides)
    cold_start = pipeline_seconds(shared_overrides(scratch, 1), fresh(scratch / "runs" / "cold"))
    bare, pipeline = [], []
    for index in range(work.orchestration_pairs):
        bare.append(bare_seconds(overrides, fresh(scratch / "runs" / f"bare-{index}")))
        pipeline.append(pipeline_seconds(overrides, fresh(scratch / "runs" / f"flow-{index}")))
    overhead = statistics.median(pipeline) / statistics.median(bare) - 1
    return measure.step_result(
        pipeline,
        items_per_step=steps,
        unit="steps/s",
        flops_per_step=None,
        trainable_params=None,
        rss_before_model_mb=rss_before,
        device=work.device,
        bare_seconds=bare,
        pipeline_seconds=pipeline,
        overhead_fraction=overhead,
        added_seconds=statistics.median(pipeline) - statistics.median(bare),
        cold_start_s=cold_start,
        steps=steps,
    )
