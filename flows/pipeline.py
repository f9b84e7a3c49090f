"""Prefect flows of the pipeline: ``dvc.yaml``'s stages, run through DVC, on the pools they name.

``dvc.yaml`` is the one definition. Each stage is a Prefect task that runs
``dvc repro --single-item <stage>``, so a Prefect run and ``dvc repro`` write the same outputs and
the same ``dvc.lock``, and a stage whose dependencies and parameters did not change is skipped
by DVC (a second run reruns nothing). The stage list, its order and each stage's work pool
(``meta.pool``) come from ``dvc.yaml`` (``llama_adapter_v2.stages``). What Prefect adds:

- ``dvc-stages`` runs consecutive stages of one pool in one checkout; ``pipeline`` runs the
  groups in order, here (``make demo``) or, with ``deployments``, each group as a run of the
  deployment for its pool, on workers that share no filesystem: a group pulls the outputs it
  reads (``dvc pull``) after recording the upstream groups' ``dvc.lock`` entries, and pushes its
  own (``dvc push``); models and metrics reach MLflow over HTTP;
- every flow run carries the config path and the data hash (``data.dvc`` md5) as tags;
- a stage that fails leaves the previous outputs in place (``dvc checkout`` restores them from
  the cache after DVC removed them);
- the pipeline run's Artifacts tab: a markdown summary (validation counts, scores against the
  zero-init baseline, the promotion decision) and links to the Data Docs, the MLflow training
  run and the model version.

Training on N GPUs: the train stage's ``lav2 train`` relaunches itself under torchrun
(``cli/train_cmd.py``), from ``LAV2_GPUS`` (the work pool's job variables) or the config's
``orchestration.gpu_pool.gpus``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import Artifact, create_link_artifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

import llama_adapter_v2  # noqa: F401 - applies the offline environment first
from llama_adapter_v2.config import Config, load_config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.evaluate.report import HEADLINE_METRICS, pipeline_report
from llama_adapter_v2.evaluate.run import eval_dir
from llama_adapter_v2.stages import (
    DATA_DEP,
    DATA_FILE,
    DVC_FILE,
    Stage,
    lock_entries,
    merge_lock,
    pipeline_config,
    pool_groups,
    read_stages,
    upstream_of,
    write_overrides,
)
from llama_adapter_v2.store import data_hash, run_link, tracking_uri, version_link

LOCK_ARTIFACT = "dvc-lock-{run}"


class StageError(RuntimeError):
    """A DVC command exited non-zero; the message holds the end of its output."""


# --------------------------------------------------------------------------- DVC


def dvc(*arguments: str) -> str:
    """Run one DVC command in the checkout; its output goes to the run's log."""
    # The stages' commands (lav2) and dvc come from this interpreter's environment, activated or not
    # (make demo runs .venv/bin/lav2 without .venv/bin on PATH).
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    executable = str(Path(scripts) / "dvc")
    finished = subprocess.run([executable, *arguments], cwd=project_root(), env=env, capture_output=True,
                              text=True, check=False)
    output = finished.stdout + finished.stderr
    if output.strip():
        get_run_logger().info("dvc %s\n%s", " ".join(arguments), output.strip()[-4000:])
    if finished.returncode != 0:
        raise StageError(f"dvc {' '.join(arguments)} exited with {finished.returncode}:\n{output[-4000:]}")
    return output


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str) -> bool:
    """``dvc repro --single-item``: True when DVC ran the stage, False when it was up to date.
    On failure the stage's previous outputs come back from the cache (DVC removed them first)."""
    try:
        output = dvc("repro", "--single-item", stage)
    except StageError:
        with contextlib.suppress(StageError):  # a stage that never ran has nothing to restore
            dvc("checkout", "--force", stage)
        raise
    return f"Running stage '{stage}'" in output


@task(name="data")
def provide_data(config_path: str, exchange: bool) -> str:
    """The data the stages read: pulled from the DVC remote by a worker of a shared pipeline; here,
    generated when absent for a demo config (byte for byte what data.dvc records for the shipped
    config)."""
    root = project_root()
    if exchange:
        dvc("pull", DATA_FILE)
        return "pulled"
    cfg = load_config(root / config_path)
    if cfg.data.demo is None or all(source.annotations.is_file() for source in cfg.data.captions):
        return "present"
    generate_demo(cfg.data)
    dvc("add", DATA_DEP)  # into the cache (data.dvc changes only if the config asked for other data)
    return "generated"


def _stages() -> dict[str, Stage]:
    return read_stages(project_root() / DVC_FILE)


def _checked_config(config_path: str, stages: dict[str, Stage]) -> str:
    """The config as dvc.yaml names it (relative to the root): the flow can run no other one."""
    named = pipeline_config(stages)
    given = Path(config_path)
    relative = given.resolve().relative_to(project_root()) if given.is_absolute() else given
    if relative.as_posix() != named:
        raise ValueError(f"{DVC_FILE}'s stages read {named}, not {config_path}: point {DVC_FILE} at it")
    return named


def _publish_lock(entries: dict[str, Any]) -> None:
    """The group's dvc.lock entries, as an artifact of its flow run: what the next group records."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    create_markdown_artifact(key=LOCK_ARTIFACT.format(run=run_id), description="dvc.lock entries",
                             markdown="```yaml\n" + yaml.safe_dump(entries, sort_keys=False) + "```\n")


def _read_lock(run_id: Any) -> dict[str, Any]:
    artifact = Artifact.get(LOCK_ARTIFACT.format(run=run_id))
    if artifact is None or not isinstance(artifact.data, str):
        raise StageError(f"flow run {run_id} published no dvc.lock entries")
    found = re.search(r"```yaml\n(.*)```", artifact.data, flags=re.DOTALL)
    return yaml.safe_load(found.group(1)) if found else {}


# --------------------------------------------------------------------------- flows


@flow(name="dvc-stages", log_prints=True)
def dvc_stages(stages: list[str], config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
               upstream_lock: dict[str, Any] | None = None, exchange: bool = False) -> dict[str, Any]:
    """Run ``stages`` (consecutive stages of one pool) through DVC in this checkout. With
    ``exchange``: record ``upstream_lock``, pull what the stages read, push what they wrote."""
    root = project_root()
    declared = _stages()
    config = _checked_config(config_path, declared)
    if write_overrides(root / config, overrides or []):
        get_run_logger().info("wrote %s into %s", ", ".join(overrides or []), config)
    merge_lock(root, upstream_lock or {})
    if any(declared[name].reads_data for name in stages):
        provide_data(config, exchange)
    if exchange and (needed := upstream_of(declared, stages)):
        dvc("pull", *needed)
    ran = [name for name in stages if run_stage(name)]
    if exchange:
        dvc("push", *stages)
    entries = lock_entries(root, stages)
    _publish_lock(entries)
    return {"ran": ran, "lock": entries}


def _run_group(pool: str, stages: list[str], deployments: dict[str, str] | None, common: dict[str, Any],
               upstream_lock: dict[str, Any]) -> dict[str, Any]:
    """A group here (a subflow), or as a run of its pool's deployment, waiting for it to finish;
    a run lost with its worker is rescheduled by the server (flows/lost_runs.py) and waited for."""
    if not deployments:
        return dvc_stages(stages=stages, **common)
    parameters = {"stages": stages, "upstream_lock": upstream_lock, "exchange": True, **common}
    run = run_deployment(deployments[pool], parameters=parameters, timeout=None)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "no state"
        raise StageError(f"{deployments[pool]} (run {run.id}): {state}")
    return {"ran": [], "lock": _read_lock(run.id)}


def run_tags(cfg: Config, config_path: str, data_version: str) -> list[str]:
    return [f"config:{Path(config_path).name}", f"run-config:{cfg.name}", f"data:{data_version}"]


def _tag_current_run(extra: list[str]) -> None:
    """Add tags to the running flow run (a deployment run gets its tags before parameters exist)."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id)
        client.update_flow_run(run_id, tags=sorted(set(current.tags) | set(extra)))


def data_docs_link(cfg: Config) -> str | None:
    """The validation's Data Docs index (``validate`` builds it; a cached run keeps the last one)."""
    index = DataPaths(cfg.data.work_dir).data_docs / "index.html"
    return (project_root() / index).resolve().as_uri() if (project_root() / index).is_file() else None


def publish_report(cfg: Config, run_id: str, version: dict[str, str], decision: dict[str, Any], *,
                   metrics: dict[str, float], baseline: dict[str, float], data_version: str) -> None:
    """The flow run's Artifacts tab: a markdown summary (the Data Docs linked) and links to the MLflow
    run and version."""
    validation_file = DataPaths(cfg.data.work_dir).validation_metrics
    validation = json.loads(validation_file.read_text(encoding="utf-8")) if validation_file.is_file() else {}
    names = list(dict.fromkeys([decision["metric"], *cfg.tracking.promotion.guards, *HEADLINE_METRICS]))
    training_page, data_docs = run_link(cfg, run_id), data_docs_link(cfg)
    create_markdown_artifact(key="pipeline-summary", description="validation, scores, promotion", markdown=(
        pipeline_report(validation=validation, metrics=metrics, baseline=baseline, names=names,
                        decision=decision, version=version, data_hash=data_version, run_link=training_page,
                        data_docs=data_docs)))
    if data_docs is not None:
        create_link_artifact(key="data-docs", link=data_docs, link_text="great-expectations Data Docs",
                             description="every expectation with its limits, failing ids, the data hash")
    create_link_artifact(key="mlflow-training-run", link=training_page, link_text=f"MLflow run {run_id}")
    version_page = version_link(cfg, version["name"], version["version"])
    create_link_artifact(key="mlflow-model-version", link=version_page,
                         link_text=f"{version['name']} version {version['version']} ({decision['outcome']})")


def report_files(cfg: Config) -> list[str]:
    """What the summary reads: the validation's counts and Data Docs, the scores, the registry record."""
    paths = DataPaths(cfg.data.work_dir)
    files = [paths.validation_metrics, paths.data_docs.parent, eval_dir(cfg) / "metrics.json",
             eval_dir(cfg, zero_init=True) / "metrics.json", REGISTRY_RECORD]
    root = project_root()
    return [str(file.relative_to(root) if file.is_absolute() else file) for file in files]


REGISTRY_RECORD = Path("artifacts/registry/demo.json")  # register's --out in dvc.yaml


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads((project_root() / path).read_text(encoding="utf-8"))


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
             deployments: dict[str, str] | None = None) -> dict[str, Any]:
    """dvc.yaml's stages in order, grouped by pool; then the summary, its artifacts and last-run.json.

    ``deployments`` maps a pool to the ``dvc-stages`` deployment that runs on it (for example
    ``{"cpu": "dvc-stages/stages-cpu", "gpu": "dvc-stages/stages-gpu"}``); without it every group
    runs here. ``overrides`` are written into the config file first (DVC reads the file)."""
    root = project_root()
    declared = _stages()
    config = _checked_config(config_path, declared)
    overrides = overrides or []
    write_overrides(root / config, overrides)
    cfg = load_config(root / config)
    if not deployments:  # the data version the runs are tagged with is the one the stages will read
        provide_data(config, exchange=False)
    data_version = data_hash(root)
    labels = run_tags(cfg, config, data_version)
    _tag_current_run(labels)
    common = {"config_path": config, "overrides": overrides}
    ran: list[str] = []
    lock: dict[str, Any] = {}
    with tags(*labels):
        for pool, stages in pool_groups(declared):
            group = _run_group(pool, stages, deployments, common, lock)
            ran += group["ran"]
            lock |= group["lock"]
        if deployments:  # the stages ran elsewhere: their records come through the remote
            merge_lock(root, lock)
            dvc("pull", *report_files(cfg))
        record = _read_json(REGISTRY_RECORD)
        metrics = _read_json(eval_dir(cfg) / "metrics.json")
        baseline = _read_json(eval_dir(cfg, zero_init=True) / "metrics.json")
        version, decision = record["version"], record["promotion"]
        publish_report(cfg, version["run_id"], version, decision, metrics=metrics, baseline=baseline,
                       data_version=data_version)
    summary = {"config_path": config, "overrides": overrides, "data_hash": data_version,
               "tracking_uri": tracking_uri(cfg), "stages_run": ran,
               "train": {"run_id": version["run_id"], "adapter_dir": str(cfg.training.output_dir / "adapter")
                         },
               "metrics": metrics, "version": version, "promotion": decision,
               "metrics_file": str(eval_dir(cfg) / "metrics.json")}
    out = root / "artifacts" / "pipeline" / "last-run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"pipeline summary written to {out}")
    return summary
