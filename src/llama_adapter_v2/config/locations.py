"""Where a config's tracking data lives by default: one rule for training, evaluation and registry."""

from __future__ import annotations

from pathlib import Path

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.environment import project_root


def embedded_tracking_uri() -> str:
    """The project's own sqlite store, ``<root>/mlruns/mlflow.db``."""
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, or the embedded store."""
    return cfg.tracking.uri or embedded_tracking_uri()


def artifact_root(cfg: Config) -> Path:
    """``tracking.artifact_root``, or ``<root>/mlruns/artifacts``."""
    return cfg.tracking.artifact_root or project_root() / "mlruns" / "artifacts"
