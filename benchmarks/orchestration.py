"""What Prefect, DVC and MLflow add to training: the train stage run by the flow against bare ``lav2 train``.

Both sides run ``lav2 train`` on the demo config, as a process, with the same data, base model,
tower and step count, in a scratch copy of the project (a git repository of its own, whose config
holds the benchmark's settings: the flow writes nothing into the project's). The bare side turns
MLflow off (``--set tracking.enabled=false``); the pipeline side runs the ``dvc-stages`` flow of
``flows/pipeline.py`` on the train stage: a Prefect flow and task, ``dvc repro --single-item train``
(hashing deps and params, writing dvc.lock, caching the outputs) and MLflow on (a sqlite store,
system metrics, artifacts). Its dvc.lock entry is dropped before each run (untimed) so DVC runs the
stage again. One untimed flow run first pays the one-off costs (Prefect's temporary server and
database, MLflow's migrations), reported apart as ``cold_start_s``. Everything is written under
``artifacts/bench/``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import measure
from benchmarks.spec import Spec

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
UPSTREAM_OF_TRAIN = ["config", "prepare", "validate", "shard", "demo-base", "demo-clip"]
LAV2 = str(Path(sys.executable).with_name("lav2"))


def scratch_dir(spec: Spec) -> Path:
    return REPO / "artifacts" / "bench" / f"orchestration-{spec.preset}"


def settings(steps: int) -> list[str]:
    return [
        f"training.steps={steps}", f"training.eval_every_steps={steps}",
        f"training.checkpoint.every_steps={steps}",
        # A few base and tower steps suffice: the overhead does not depend on what they learned.
        "training.demo_base.steps=5", "training.demo_clip.steps=5",
    ]


def scratch_project(scratch: Path, steps: int) -> Path:
    """The project's tracked files in a git repository of their own, the settings in its config."""
    from llama_adapter_v2.stages import write_overrides

    project = scratch / "project"
    if not (project / ".git").is_dir():
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout.decode()
        for relative in filter(None, listed.split("\0")):
            if (REPO / relative).is_file():
                (project / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / relative, project / relative)
        (project / "mlruns").mkdir(exist_ok=True)
        for command in (["git", "init", "-q"], ["git", "add", "-A"],
                        ["git", "-c", "user.name=b", "-c", "user.email=b@localhost", "commit", "-qm", "b"]):
            subprocess.run(command, cwd=project, check=True, capture_output=True)
    write_overrides(project / CONFIG, settings(steps))
    return project


def forget_train(project: Path) -> None:
    """Drop the train stage's dvc.lock entry, so that DVC runs it again."""
    lock_file = project / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8"))
    lock["stages"].pop("train", None)
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


def bare_seconds(project: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([LAV2, "train", CONFIG, "--set", "tracking.enabled=false", "--set",
                    f"training.output_dir={out}"], cwd=project, check=True, capture_output=True)
    return time.perf_counter() - started


def pipeline_seconds(project: Path) -> float:
    from flows.pipeline import dvc_stages

    forget_train(project)
    started = time.perf_counter()
    dvc_stages(stages=["train"], config_path=CONFIG)
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
    project = scratch_project(scratch, steps)
    os.environ["LAV2_ROOT"] = str(project)  # the flow's checkout; its stages' lav2 processes inherit it
    from flows.pipeline import dvc_stages

    dvc_stages(stages=UPSTREAM_OF_TRAIN, config_path=CONFIG)  # untimed: the train stage's inputs
    cold_start = pipeline_seconds(project)
    bare, pipeline = [], []
    for index in range(work.orchestration_pairs):
        bare.append(bare_seconds(project, fresh(scratch / "runs" / f"bare-{index}")))
        pipeline.append(pipeline_seconds(project))
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
