"""Prefect flows of the pipeline: thin wrappers over the library, one per stage, and ``pipeline``.

Each task calls the same library function as the matching ``dvc.yaml`` stage (which reaches it
through ``lav2``), so a Prefect deployment and ``dvc repro`` produce the same artifacts; the one
extra task regenerates the demo data when it is absent (DVC versions it in ``data.dvc``).
What Prefect adds:

- every flow run carries the config path and the data hash (``data.dvc`` md5) as parameters
  and as tags (``config:<name>``, ``data:<hash>``);
- tasks that read or write files retry on transient errors only (network drops, timeouts,
  flaky-storage errnos), never on a missing file or a bad value;
- training never restarts blindly: it always runs ``train(cfg, resume=True)``, so a retry or a
  re-run continues from the last complete checkpoint of the same training (same config sections,
  data and tracking store; another training's checkpoints are removed first);
- unchanged inputs reuse cached results: a stage's cache key hashes the config parameters
  ``dvc.yaml`` lists for it, the keys of the stages upstream of it and the data hash
  (``llama_adapter_v2.stages`` reads them from ``dvc.yaml``: one list for DVC and Prefect);
  results are stored as JSON (never pickled), and a stage whose outputs are gone runs again
  (``refresh_cache``).

On a worker with N > 1 GPUs (``LAV2_GPUS`` from the work pool's job variables, else the
visible CUDA devices) training runs as ``torchrun --nproc-per-node N``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

import llama_adapter_v2  # noqa: F401 - applies the offline environment first
from llama_adapter_v2.config import Config, load_config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.pipeline import KINDS, prepare, shard, validate
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.evaluate.report import HEADLINE_METRICS, pipeline_report
from llama_adapter_v2.evaluate.run import EvalOptions, eval_dir, evaluate
from llama_adapter_v2.registry import promote, register, with_baseline
from llama_adapter_v2.stages import DEMO_DATA, stage_key, training_identity
from llama_adapter_v2.store import UNTRACKED, data_hash, run_link, tracking_uri, version_link
from llama_adapter_v2.train.checkpoint import recorded_run_id
from llama_adapter_v2.train.demo_base import train_demo_base
from llama_adapter_v2.train.demo_clip import train_demo_clip
from llama_adapter_v2.train.loop import train

TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}
IDENTITY_FILE = "training-identity.txt"


# --------------------------------------------------------------------------- helpers


def load(config_path: str, overrides: list[str] | None) -> Config:
    return load_config(config_path, overrides or ())


def _given_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return parameters.get("cache_key")


def is_transient(error: BaseException) -> bool:
    """Network drops, timeouts and flaky-storage errnos; not a missing file or a bad value."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    name = type(error).__name__
    library = type(error).__module__.split(".")[0]
    return library in {"requests", "urllib3", "httpx"} and ("Connection" in name or "Timeout" in name)


def retry_only_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups; a wrong config or a diverged loss fails the same way every time."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 2, "retry_delay_seconds": 3, "retry_condition_fn": retry_only_transient,
}


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


def gpu_count() -> int:
    if value := os.environ.get("LAV2_GPUS"):
        return int(value)
    return torch.cuda.device_count()


def torchrun_command(config_path: str, overrides: list[str], n_gpus: int) -> list[str]:
    """The multi-GPU launch of the same training entry point as ``lav2 train``."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    lav2 = shutil.which("lav2") or str(Path(sys.executable).with_name("lav2"))
    return ["torchrun", "--standalone", f"--nproc-per-node={n_gpus}", "--no-python",
            lav2, "train", config_path, "--resume", *sets]


def train_summary(result: Any) -> dict[str, Any]:
    """The JSON-able part of a ``TrainResult`` (what later stages and the cache need)."""
    return {"run_id": result.run_id, "adapter_dir": str(result.adapter_dir),
            "checkpoint_dir": str(result.checkpoint_dir), "final_metrics": result.final_metrics,
            "seconds": result.seconds}


def read_train_result(cfg: Config, seconds: float) -> dict[str, Any]:
    """What a torchrun-launched training left behind: the newest complete checkpoint names its run."""
    checkpoints = cfg.training.output_dir / "checkpoints"
    run_id = recorded_run_id(checkpoints)
    if run_id is None and cfg.tracking.enabled:
        raise FileNotFoundError(f"torchrun finished; no complete checkpoint in {checkpoints} names its run")
    return {"run_id": run_id, "adapter_dir": str(cfg.training.output_dir / "adapter"),
            "checkpoint_dir": str(checkpoints), "final_metrics": {}, "seconds": seconds}


def claim_checkpoints(output_dir: Path, identity: str) -> str | None:
    """Resume only checkpoints of this training: another config's (or tracking store's) are
    removed first, as DVC removes a stage's outputs before re-running it. Returns what the
    removed checkpoints were trained as (``"unknown"`` without a record), or None."""
    marker = output_dir / IDENTITY_FILE
    checkpoints = output_dir / "checkpoints"
    previous = marker.read_text(encoding="utf-8") if marker.is_file() else "unknown"
    removed = None
    if checkpoints.exists() and previous != identity:
        shutil.rmtree(checkpoints)
        removed = previous
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(identity, encoding="utf-8")
    return removed


def _cached(task_fn: Any, key: str | None, outputs_present: bool) -> Any:
    return task_fn.with_options(refresh_cache=not outputs_present) if key else task_fn


# --------------------------------------------------------------------------- tasks


task_options: dict[str, Any] = {
    "cache_key_fn": _given_key, "persist_result": True, "result_serializer": "json",
}


@task(name="demo-data", **IO_RETRIES, **task_options)
def demo_data_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, int]:
    return generate_demo(load(config_path, overrides).data)


@task(name="prepare", **IO_RETRIES, **task_options)
def prepare_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, int]:
    return prepare(load(config_path, overrides), project_root())


@task(name="validate", **IO_RETRIES, **task_options)
def validate_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, Any]:
    summary = validate(load(config_path, overrides), project_root(), data_hash(project_root()))
    for kind in KINDS:
        counts = summary[kind]
        get_run_logger().info("%s: %d records in, %d clean, %d quarantined, %d duplicates", kind,
                              counts["input"], counts["clean"], counts["quarantined"],
                              counts["duplicates"]["count"])
    return summary


@task(name="shard", **IO_RETRIES, **task_options)
def shard_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, Any]:
    return shard(load(config_path, overrides), project_root())


@task(name="demo-base", **IO_RETRIES, **task_options)
def demo_base_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, Any]:
    result = train_demo_base(load(config_path, overrides))
    return {"path": str(result.path), "final_loss": result.losses[-1], "seconds": result.seconds}


@task(name="demo-clip", **IO_RETRIES, **task_options)
def demo_clip_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, Any]:
    result = train_demo_clip(load(config_path, overrides))
    return {"path": str(result.path), "final_loss": result.losses[-1],
            "final_accuracy": result.accuracies[-1], "seconds": result.seconds}


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
      **task_options)
def train_task(config_path: str, overrides: list[str], identity: str, cache_key: str | None
               ) -> dict[str, Any]:
    """``train(cfg, resume=True)``: a retry or re-run continues from the last complete checkpoint."""
    cfg = load(config_path, overrides)
    if removed := claim_checkpoints(cfg.training.output_dir, identity):
        get_run_logger().warning("removed checkpoints of training %s (this is %s): starting afresh",
                                 removed, identity)
    n_gpus = gpu_count()
    if n_gpus > 1:
        command = torchrun_command(config_path, overrides, n_gpus)
        get_run_logger().info("launching %s", " ".join(command))
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=project_root())
        return read_train_result(cfg, time.perf_counter() - started)

    summary = train_summary(train(cfg, resume=True))
    get_run_logger().info("trained in %.1f s; MLflow run %s", summary["seconds"], summary["run_id"])
    return summary


@task(name="evaluate", **IO_RETRIES, **task_options)
def evaluate_task(config_path: str, overrides: list[str], adapter_dir: str, run_id: str | None,
                  cache_key: str | None) -> dict[str, float]:
    """Scores go into a child run of the training run (the training run stays as it was)."""
    metrics = evaluate(load(config_path, overrides), Path(adapter_dir), EvalOptions(run_id=run_id))
    _log_headline("held-out", metrics)
    return metrics


@task(name="baseline", **IO_RETRIES, **task_options)
def baseline_task(config_path: str, overrides: list[str], cache_key: str | None) -> dict[str, float]:
    """The zero-init model on the same held-out data (its own MLflow run): what a version must beat."""
    metrics = evaluate(load(config_path, overrides), None)
    _log_headline("zero-init baseline", metrics)
    return metrics


@task(name="register", **IO_RETRIES, **task_options)
def register_task(config_path: str, overrides: list[str], *, run_id: str, adapter_dir: str,
                  metrics: dict[str, float], cache_key: str | None) -> dict[str, str]:

    version = register(load(config_path, overrides), run_id, Path(adapter_dir), metrics)
    get_run_logger().info("registered %s version %s (evaluation %s)", version.name, version.version,
                          version.evaluation)
    return {"name": version.name, "version": version.version, "evaluation": version.evaluation}


@task(name="promote", **IO_RETRIES)
def promote_task(config_path: str, overrides: list[str], version: str) -> dict[str, Any]:
    decision = promote(load(config_path, overrides), version)
    get_run_logger().info("version %s %s: %s", version, decision.outcome, decision.reason)
    return asdict(decision)


def _log_headline(what: str, metrics: dict[str, float]) -> None:
    shown = ", ".join(f"{name} {metrics[name]:.4g}" for name in HEADLINE_METRICS if name in metrics)
    get_run_logger().info("%s: %s (%d metrics)", what, shown, len(metrics))


# The dvc.yaml stage each task runs (dvc's ``config`` stage only snapshots the resolved config),
# and the demo data that DVC versions in data.dvc instead.
TASK_OF_STAGE: dict[str, Any] = {
    DEMO_DATA: demo_data_task, "prepare": prepare_task, "validate": validate_task, "shard": shard_task,
    "demo-base": demo_base_task, "demo-clip": demo_clip_task, "baseline": baseline_task, "train": train_task,
    "evaluate": evaluate_task, "register": register_task,
}


# --------------------------------------------------------------------------- flows


@flow(name="validate-data", log_prints=True)
def validate_data(config_path: str, overrides: list[str] | None = None, data_hash: str = UNTRACKED
                  ) -> dict[str, Any]:
    """Demo data (generated when absent), then prepare -> validate (Great Expectations) -> shard."""
    overrides = overrides or []
    cfg = load(config_path, overrides)
    paths = DataPaths(cfg.data.work_dir)
    if cfg.data.demo is not None:
        key = stage_key(DEMO_DATA, cfg, data_hash)
        present = all(source.annotations.is_file() for source in cfg.data.captions)
        _cached(TASK_OF_STAGE[DEMO_DATA], key, present)(config_path, overrides, cache_key=key)
    summary: dict[str, Any] = {}
    for stage, output in (("prepare", paths.prepared), ("validate", paths.validation_metrics),
                          ("shard", paths.shard_metrics)):
        key = stage_key(stage, cfg, data_hash)
        task_fn = TASK_OF_STAGE[stage]
        summary[stage] = _cached(task_fn, key, output.exists())(config_path, overrides, cache_key=key)
    return summary


@flow(name="train", log_prints=True)
def train_flow(config_path: str, overrides: list[str] | None = None, data_hash: str = UNTRACKED
               ) -> dict[str, Any]:
    """The demo base and CLIP tower (when the config asks for them and they are missing), then the adapter."""
    overrides = overrides or []
    cfg = load(config_path, overrides)
    if cfg.data.demo is not None:
        for stage, folder in (("demo-base", cfg.model.base.path), ("demo-clip", cfg.model.vision.path)):
            if folder is None:
                continue
            key = stage_key(stage, cfg, data_hash)
            present = (folder / "config.json").is_file()
            _cached(TASK_OF_STAGE[stage], key, present)(config_path, overrides, cache_key=key)
    key = stage_key("train", cfg, data_hash)
    present = (cfg.training.output_dir / "checkpoints" / "best").is_dir()
    identity = training_identity(cfg, data_hash)
    return _cached(TASK_OF_STAGE["train"], key, present)(config_path, overrides, identity, cache_key=key)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config_path: str, *, adapter_dir: str, run_id: str | None = None,
                  overrides: list[str] | None = None, data_hash: str = UNTRACKED) -> dict[str, float]:
    overrides = overrides or []
    cfg = load(config_path, overrides)
    key = stage_key("evaluate", cfg, data_hash)
    present = (eval_dir(cfg) / "metrics.json").is_file()
    evaluate_cached = _cached(TASK_OF_STAGE["evaluate"], key, present)
    return evaluate_cached(config_path, overrides, adapter_dir, run_id, cache_key=key)


@flow(name="baseline", log_prints=True)
def baseline_flow(config_path: str, overrides: list[str] | None = None, data_hash: str = UNTRACKED
                  ) -> dict[str, float]:
    """Scored once per data, base and tower version (the stage key holds them), reused by every run."""
    overrides = overrides or []
    cfg = load(config_path, overrides)
    key = stage_key("baseline", cfg, data_hash)
    present = (eval_dir(cfg, zero_init=True) / "metrics.json").is_file()
    return _cached(TASK_OF_STAGE["baseline"], key, present)(config_path, overrides, cache_key=key)


@flow(name="register", log_prints=True)
def register_flow(config_path: str, *, run_id: str, adapter_dir: str, metrics: dict[str, float],
                  overrides: list[str] | None = None, data_hash: str = UNTRACKED) -> dict[str, str]:
    cfg = load(config_path, overrides)
    inputs = [run_id, adapter_dir, metrics, cfg.tracking.uri, cfg.tracking.registered_model]
    key = "lav2-register-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return TASK_OF_STAGE["register"](config_path, overrides or [], run_id=run_id, adapter_dir=adapter_dir,
                                     metrics=metrics, cache_key=key)


@flow(name="promote", log_prints=True)
def promote_flow(config_path: str, version: str, overrides: list[str] | None = None,
                 data_hash: str = UNTRACKED) -> dict[str, Any]:
    return promote_task(config_path, overrides or [], version)


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


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """validate-data -> train -> evaluate (and the zero-init baseline) -> register -> promote."""
    overrides = overrides or []
    cfg = load(config_path, overrides)
    data_version = data_hash(project_root())
    labels = run_tags(cfg, config_path, data_version)
    _tag_current_run(labels)
    common = {"config_path": config_path, "overrides": overrides, "data_hash": data_version}
    with tags(*labels):
        validate_data(**common)
        trained = train_flow(**common)
        metrics = evaluate_flow(adapter_dir=trained["adapter_dir"], run_id=trained["run_id"], **common)
        baseline = baseline_flow(**common)
        version = register_flow(run_id=trained["run_id"], adapter_dir=trained["adapter_dir"],
                                metrics=with_baseline(metrics, baseline), **common)
        decision = promote_flow(version=version["version"], **common)
        publish_report(cfg, trained["run_id"], version, decision, metrics=metrics, baseline=baseline,
                       data_version=data_version)
    summary = {"config_path": config_path, "overrides": overrides, "data_hash": data_version,
               "tracking_uri": tracking_uri(cfg),
               "train": trained, "metrics": metrics, "version": version, "promotion": decision,
               "metrics_file": str(eval_dir(cfg) / "metrics.json")}
    out = project_root() / "artifacts" / "pipeline" / "last-run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"pipeline summary written to {out}")
    return summary
