"""Register a trained adapter as a new version of the configured registered model.

The model is an MLflow pyfunc logged *from code* (``pyfunc_model.py``): loading it executes that
file instead of unpickling objects. It carries the adapter folder as an artifact and names the
frozen base and CLIP tower by path and identity, so a version cannot silently load onto a
different base. Versions are created with ``MlflowClient.create_model_version`` on the logged
model's URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from llama_adapter_v2.config import Config
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.store import data_hash, ensure_experiment, evaluation_run_of, git_commit, use_tracking

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME_IN_RUN = "model"
TAG_EVALUATION = "evaluation"  # passed | failed | missing
METRIC_TAG_PREFIX = "metric."
BASELINE_PREFIX = "baseline_"  # the zero-init model's metrics, stored beside the candidate's


def with_baseline(
    metrics: dict[str, float] | None, baseline: dict[str, float] | None
) -> dict[str, float] | None:
    """The candidate's metrics plus the zero-init model's as ``baseline_<metric>``: what the gate compares."""
    if metrics is None or not baseline:
        return metrics
    return {**metrics, **{f"{BASELINE_PREFIX}{key}": value for key, value in baseline.items()}}


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str
    evaluation: str


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_digest(cfg: Config) -> str:
    """Hash of the resolved config: equal configs give equal digests whatever their YAML layout."""
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()[:16]


def folder_identity(folder: Path) -> str:
    """sha256 over the names and bytes of the config and weight files of a model folder."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".model", ".txt"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def component_identity(path: Path | None, arch: object) -> str:
    """A folder's content hash, or for a tower built from ``arch`` the hash of that architecture."""
    if path is not None and path.is_dir():
        return "sha256:" + folder_identity(path)
    arch_json = json.dumps(getattr(arch, "model_dump", dict)(mode="json"), sort_keys=True)
    return "arch-sha256:" + hashlib.sha256(arch_json.encode()).hexdigest()


def model_identity(cfg: Config) -> dict[str, str]:
    base, vision = cfg.model.base, cfg.model.vision
    return {
        "base_path": str(base.path or ""),
        "base_identity": component_identity(base.path, base.arch),
        "vision_path": str(vision.path or ""),
        "vision_identity": component_identity(vision.path, vision.arch),
    }


def evaluation_status(metrics: dict[str, float] | None) -> str:
    """The candidate's own metrics decide; its baseline's are the gate's concern."""
    own = {key: value for key, value in (metrics or {}).items() if not key.startswith(BASELINE_PREFIX)}
    if not own:
        return "missing"
    return "passed" if all(math.isfinite(value) for value in own.values()) else "failed"


def _signature() -> object:
    inputs = Schema([
        ColSpec("string", "image"),
        ColSpec("string", "instruction"),
        ColSpec("string", "history", required=False),
    ])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 32)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "answer")]), params=params)


def _pip_requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "mlflow", "pillow", "pandas")]


def missing_gated_metrics(cfg: Config, metrics: dict[str, float] | None) -> list[str]:
    """The gate's and guards' metrics an evaluated version lacks: a misspelt name (say a training
    metric such as ``caption_holdout_loss``, which no evaluation records) would hold every promotion."""
    if metrics is None:
        return []
    promotion = cfg.tracking.promotion
    return [name for name in (promotion.metric, *promotion.guards) if name not in metrics]


def version_tags(cfg: Config, metrics: dict[str, float] | None) -> dict[str, str]:
    root = project_root()
    tags = {
        "git_commit": git_commit(root),
        "data_hash": data_hash(root),
        "config_digest": config_digest(cfg),
        TAG_EVALUATION: evaluation_status(metrics),
        **model_identity(cfg),
    }
    gated = {cfg.tracking.promotion.metric, *cfg.tracking.promotion.guards}
    kept = {key: value for key, value in (metrics or {}).items()  # of the baseline, what the gate reads
            if not key.startswith(BASELINE_PREFIX) or key.removeprefix(BASELINE_PREFIX) in gated}
    tags.update({f"{METRIC_TAG_PREFIX}{key}": repr(float(value)) for key, value in kept.items()})
    return tags


def register(
    cfg: Config, run_id: str, adapter_dir: Path, metrics: dict[str, float] | None
) -> RegisteredVersion:
    """Log the adapter as a pyfunc (in ``run_id``'s evaluation run, if any) and make it a new version of
    the registered model that points at the training run ``run_id`` and at that evaluation run."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} not found: train first")
    if missing := missing_gated_metrics(cfg, metrics):
        log.warning("the evaluation recorded no %s, which tracking.promotion gates or guards on; "
                    "it records: %s", ", ".join(missing), ", ".join(sorted(metrics or {})))
    client = use_tracking(cfg)
    experiment_id = ensure_experiment(cfg)
    evaluation_run = evaluation_run_of(client, experiment_id, run_id)
    # the model goes to the evaluation run (or, unevaluated, to no run of the project's experiment):
    # the training run stays as training left it
    mlflow.set_experiment(experiment_id=experiment_id)
    in_run = mlflow.start_run(run_id=evaluation_run) if evaluation_run else contextlib.nullcontext()
    with in_run, warnings.catch_warnings():
        # the signature is explicit; an input example would make MLflow load and run the model here
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_CODE),
            artifacts={"adapter": str(adapter_dir)},
            model_config={"config": config_json(cfg), **model_identity(cfg)},
            signature=_signature(),
            pip_requirements=_pip_requirements(),
        )
    try:
        client.get_registered_model(cfg.tracking.registered_model)
    except MlflowException:
        client.create_registered_model(cfg.tracking.registered_model)
    tags = version_tags(cfg, metrics) | {"training_run_id": run_id, "evaluation_run_id": evaluation_run or ""}
    version = client.create_model_version(
        cfg.tracking.registered_model, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id
    )
    return RegisteredVersion(
        name=version.name,
        version=str(version.version),
        run_id=run_id,
        model_uri=f"models:/{version.name}/{version.version}",
        evaluation=tags[TAG_EVALUATION],
    )
