"""A model for inference, built one way: from a config and an adapter folder (or none: zero-init).

An adapter folder written by ``save_adapter`` records the model section of its config, so it
rebuilds on its own; a training run (``runs:/<id>``) or a registered version
(``models:/name@alias``) is first downloaded from the MLflow store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.build import build_model, load_tokenizer
from llama_adapter_v2.model.checkpoint import META_FILE, load_adapter, saved_model_config
from llama_adapter_v2.store import REGISTRY_PREFIX, RUN_PREFIX, download, is_store_uri


@dataclass
class LoadedModel:
    model: LlamaAdapterV2
    tokenizer: PreTrainedTokenizerBase
    config: Config
    adapter_dir: Path


def inference_model(cfg: Config, adapter_dir: Path | str | None, *, device: str = "cpu") -> LlamaAdapterV2:
    """``cfg``'s model in fp32 and eval mode, with the adapter of ``adapter_dir`` (None: zero-init)."""
    model = build_model(cfg, device=device, dtype=torch.float32)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model.eval()


def model_from_adapter(adapter_dir: Path, *, device: str = "cpu") -> tuple[LlamaAdapterV2, Config]:
    """The model an adapter folder records (base, tower and adapter), and the config that builds it."""
    cfg = Config(name=f"inference:{adapter_dir.name}", model=saved_model_config(adapter_dir))
    return inference_model(cfg, adapter_dir, device=device), cfg


def resolve_adapter_dir(source: str | Path, tracking_uri: str | None = None) -> Path:
    """An adapter folder for ``source``: the folder itself, or a run's or registered version's, downloaded."""
    text = str(source)
    if is_store_uri(text):
        found = sorted(download(text, tracking_uri).rglob(META_FILE))
        if not found:
            raise FileNotFoundError(f"{text}: holds no adapter folder (no {META_FILE})")
        return found[0].parent
    folder = Path(text)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: not an adapter folder (no {META_FILE}); give a folder written by training "
            f"(<output_dir>/adapter or a checkpoint's adapter/), a {RUN_PREFIX}<run id> or a "
            f"{REGISTRY_PREFIX}name@alias URI"
        )
    return folder


def load_for_inference(
    source: str | Path, *, tracking_uri: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Base, tower, adapter and tokenizer of a folder, a run or a registered version, in eval mode."""
    adapter_dir = resolve_adapter_dir(source, tracking_uri)
    model, cfg = model_from_adapter(adapter_dir, device=device)
    return LoadedModel(model=model, tokenizer=load_tokenizer(cfg), config=cfg, adapter_dir=adapter_dir)
