"""Where MLflow runs and registered models live for a config.

A config without ``tracking.uri`` uses the embedded store ``sqlite:///<root>/mlruns/mlflow.db``
with artifacts under ``<root>/mlruns/artifacts`` (MLflow's file store is deprecated, and without
an explicit artifact location artifacts land in whatever the current directory is). A config
pointing at an ``http://`` tracking server leaves artifact placement to that server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.locations import artifact_root, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient




def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_tracking(cfg: Config) -> MlflowClient:
    """Point the mlflow module at the config's store and return a client for it."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(cfg: Config) -> str:
    """The experiment id of ``tracking.experiment``, created with a pinned artifact location."""
    client = use_tracking(cfg)
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if not is_remote(tracking_uri(cfg)):
        folder = artifact_root(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        location = folder.resolve().as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
