"""Load an adapted model for inference from an adapter folder or a registered ``models:/`` URI.

An adapter folder written by ``save_adapter`` records the model section of its config, so it
rebuilds on its own. A registered version is downloaded with MLflow and its adapter artifact
loaded the same way; MLflow is imported only for such URIs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.store import embedded_tracking_uri

REGISTRY_PREFIX = "models:/"
ADAPTER_META = "adapter.json"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: Config
    adapter_dir: Path


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def download_registered_adapter(uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """Download ``models:/name@alias`` (or ``/version``) and return its adapter folder."""
    import mlflow

    resolved = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    target = dst or Path(tempfile.mkdtemp(prefix="lav2-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    found = sorted(local.rglob(ADAPTER_META))
    if not found:
        raise FileNotFoundError(f"{uri}: the registered model holds no adapter folder (no {ADAPTER_META})")
    return found[0].parent


def resolve_adapter_dir(source: str | Path, tracking_uri: str | None = None) -> Path:
    """An adapter folder for ``source``: the folder itself, or a registered model downloaded."""
    text = str(source)
    if text.startswith(REGISTRY_PREFIX):
        return download_registered_adapter(text, tracking_uri)
    folder = Path(text)
    if not (folder / ADAPTER_META).is_file():
        raise FileNotFoundError(
            f"{folder}: not an adapter folder (no {ADAPTER_META}); give a folder written by training "
            f"(<output_dir>/adapter or a checkpoint's adapter/) or a {REGISTRY_PREFIX}name@alias URI"
        )
    return folder


def load_for_inference(
    source: str | Path, *, tracking_uri: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Base, tower and adapter rebuilt from the adapter's own record, in eval mode."""
    import torch

    from llama_adapter_v2.model.build import build_model, load_tokenizer
    from llama_adapter_v2.model.checkpoint import load_adapter, saved_model_config

    adapter_dir = resolve_adapter_dir(source, tracking_uri)
    cfg = Config(name=f"inference:{adapter_dir.name}", model=saved_model_config(adapter_dir))
    model = build_model(cfg, device=device, dtype=torch.float32)
    load_adapter(model, adapter_dir)
    return LoadedModel(model=model.eval(), tokenizer=load_tokenizer(cfg), config=cfg, adapter_dir=adapter_dir)
