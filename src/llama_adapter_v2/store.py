"""The MLflow store of a config: where it is, its experiment, how to fetch what a run or a registered
version holds, and what a run records about its origin (code commit and data hash).

Training, evaluation, the registry and inference all reach MLflow through these functions, so
the rules live once: a config without ``tracking.uri`` uses the embedded store
``sqlite:///<root>/mlruns/mlflow.db`` (MLflow's file store is deprecated); a local store puts an
experiment's artifacts under ``<artifact_root>/<experiment>`` (without an explicit location they
would land in whatever the current directory is); an ``http://`` server places them itself.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.environment import project_root

UNTRACKED = "untracked"
RUN_PREFIX = "runs:/"
REGISTRY_PREFIX = "models:/"
RUN_ADAPTER_PATH = "adapter"  # where training logs the final adapter in its run
# An evaluation is a run of its own, a child of the training run it scores (which it never changes):
STAGE_TAG = "lav2.stage"
TRAINING_RUN_TAG = "lav2.training_run_id"


class TrackingUnavailableError(RuntimeError):
    """The configured tracking server cannot be reached."""


# --------------------------------------------------------------------------- where


def embedded_tracking_uri() -> str:
    """The project's own sqlite store, ``<root>/mlruns/mlflow.db``."""
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, or the embedded store."""
    return cfg.tracking.uri or embedded_tracking_uri()


def default_tracking_uri() -> str:
    """For a ``models:/`` or ``runs:/`` source given without a config: ``MLFLOW_TRACKING_URI``, else
    the embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def experiment_artifact_location(cfg: Config) -> str | None:
    """``<artifact_root>/<experiment>`` as a file URI for a local store; None lets a server choose."""
    if is_remote(tracking_uri(cfg)):
        return None
    root = cfg.tracking.artifact_root or project_root() / "mlruns" / "artifacts"
    folder = root / cfg.tracking.experiment
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve().as_uri()


# --------------------------------------------------------------------------- connect


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not is_remote(uri):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingUnavailableError(
                    f"MLflow tracking server {uri} answered {response.status} on /health"
                )
    except (urllib.error.URLError, OSError) as err:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it (for example "
            f"`mlflow server --host 127.0.0.1 --port <port>`) or set tracking.uri to a sqlite:/// store; "
            f"nothing was trained."
        ) from None


def use_store(uri: str) -> MlflowClient:
    """Point the mlflow module (fluent API) at ``uri`` and return a client for its runs and registry."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use_tracking(cfg: Config) -> MlflowClient:
    """The config's store, made current (see :func:`use_store`)."""
    return use_store(tracking_uri(cfg))


# MLflow's UI opens an experiment of no declared kind on its GenAI overview (traces, prompts);
# a training project's experiment is declared one of model development, so it opens on its runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(cfg: Config) -> str:
    """The id of ``tracking.experiment``, created with its artifact location and kind when new."""
    client = use_tracking(cfg)
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = experiment_artifact_location(cfg)
    return str(client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                        tags=EXPERIMENT_KIND))


# --------------------------------------------------------------------------- fetch


def ui_base(cfg: Config) -> str:
    """MLflow's UI: the tracking server itself, or where ``mlflow ui`` serves a local store by default."""
    uri = tracking_uri(cfg)
    return uri.rstrip("/") if is_remote(uri) else "http://127.0.0.1:5000"


def run_link(cfg: Config, run_id: str) -> str:
    experiment = use_tracking(cfg).get_run(run_id).info.experiment_id
    return f"{ui_base(cfg)}/#/experiments/{experiment}/runs/{run_id}"


def version_link(cfg: Config, name: str, version: str) -> str:
    return f"{ui_base(cfg)}/#/models/{name}/versions/{version}"


def evaluation_run_of(client: MlflowClient, experiment_id: str, training_run_id: str) -> str | None:
    """The latest evaluation run of ``training_run_id`` (None when it was never evaluated with tracking)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TRAINING_RUN_TAG}` = '{training_run_id}' and tags.`{STAGE_TAG}` = 'evaluate'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def is_store_uri(source: str) -> bool:
    return source.startswith((REGISTRY_PREFIX, RUN_PREFIX))


@dataclass(frozen=True)
class PinnedVersion:
    """One version of a registered model, and the alias it was asked for by (if any)."""

    name: str
    version: str
    alias: str | None
    run_id: str | None

    @property
    def uri(self) -> str:
        """The version by number: it names the same weights even after the alias moves."""
        return f"{REGISTRY_PREFIX}{self.name}/{self.version}"


def pinned_version(source: str, tracking: str | None = None) -> PinnedVersion | None:
    """The version ``models:/name@alias``, ``models:/name/<version>`` or ``models:/name/latest`` (the
    highest version, as MLflow reads it) names now; None for other sources."""
    if not source.startswith(REGISTRY_PREFIX):
        return None
    client = use_store(tracking or default_tracking_uri())
    path = source.removeprefix(REGISTRY_PREFIX).strip("/")
    if "@" in path:
        name, alias = path.split("@", 1)
        found = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = path.partition("/")
        latest = number == "latest"
        alias, found = None, _latest(client, name) if latest else client.get_model_version(name, number)
    return PinnedVersion(name=name, version=str(found.version), alias=alias, run_id=found.run_id)


def _latest(client: MlflowClient, name: str) -> ModelVersion:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise MlflowException(f"registered model {name!r} has no versions", RESOURCE_DOES_NOT_EXIST)
    return max(versions, key=lambda found: int(found.version))


def download(source: str, tracking: str | None = None, dst: Path | None = None) -> Path:
    """What ``models:/name@alias`` (or ``/version``) holds, or a training run (``runs:/<run id>``:
    its ``adapter`` artifact), downloaded from the store (``tracking``, else the default store)."""
    use_store(tracking or default_tracking_uri())
    artifact = source
    if source.startswith(RUN_PREFIX) and "/" not in source.removeprefix(RUN_PREFIX).strip("/"):
        artifact = f"{source.rstrip('/')}/{RUN_ADAPTER_PATH}"
    target = dst or Path(tempfile.mkdtemp(prefix="lav2-model-"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=str(target)))


# --------------------------------------------------------------------------- provenance


def git_commit(root: Path) -> str:
    """HEAD of the checkout, with ``-dirty`` when tracked files differ from it (``untracked`` outside git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNTRACKED
    return f"{head}-dirty" if dirty else head


def data_hash(root: Path) -> str:
    """The md5 DVC recorded for the data folder in ``data.dvc`` (``untracked`` without it)."""
    dvc_file = root / "data.dvc"
    if not dvc_file.is_file():
        return UNTRACKED
    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise ValueError(f"{dvc_file}: outs[0].md5 missing; run `dvc add data` again")
    return str(outs[0]["md5"])
