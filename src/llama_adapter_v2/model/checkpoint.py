"""Adapter-only checkpoints: ``adapter.safetensors`` plus ``adapter.json``.

``adapter.json`` holds the adapter config, the model section of the config that built it (so
``lav2 fold`` can rebuild the base), and the identity of the frozen base: architecture, shape
and a SHA-256 of the architecture-defining part of its config. Loading onto another base fails
and says what differs. Files are written to a temporary name and renamed (atomic), the JSON
last, so a folder with ``adapter.json`` always has a complete weights file. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from llama_adapter_v2.config.schema import AdapterConfig, ModelConfig
from llama_adapter_v2.model.adapter import LlamaAdapterV2

WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1
# Keys that define what a Llama computes. Runtime keys (dtype, attention implementation,
# transformers version, _name_or_path) change on save and reload without changing the model.
IDENTITY_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)


class AdapterMismatchError(ValueError):
    """The adapter was trained for another base model or another adapter config."""


def base_identity(config: PretrainedConfig) -> dict[str, Any]:
    data = config.to_dict()
    canonical = json.dumps(
        {k: data.get(k) for k in IDENTITY_CONFIG_KEYS}, sort_keys=True, separators=(",", ":")
    )
    return {
        "architecture": type(config).__name__.removesuffix("Config") + "ForCausalLM",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "config_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    }


def _write_atomic(path: Path, write: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_adapter(
    model: LlamaAdapterV2, folder: Path | str, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapter parameters and their metadata into ``folder`` (created if needed).

    ``state``: the model's ``adapter_state_dict()`` taken by the caller. Sharded (FSDP) training
    gathers it on every rank, since gathering is a collective, and only rank 0 writes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.adapter_state_dict() if state is None else state
    tensors = {name: tensor.contiguous().cpu() for name, tensor in state.items()}
    _write_atomic(
        folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"})
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "adapter": model.adapter_config.model_dump(mode="json"),
        "model": model.model_config.model_dump(mode="json") if model.model_config is not None else None,
        "base": base_identity(model.base.config),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _write_atomic(folder / META_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return folder


def read_adapter_meta(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no adapter metadata (is {folder} an adapter folder written by save_adapter?)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterMismatchError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def saved_model_config(folder: Path | str) -> ModelConfig:
    """The model section of the config the adapter was trained with (for rebuilding it)."""
    meta = read_adapter_meta(folder)
    if meta.get("model") is None:
        raise AdapterMismatchError(f"{Path(folder) / META_FILE}: no model config recorded")
    config = ModelConfig.model_validate(meta["model"])
    for part in (config.base, config.vision):  # a folded export names its base relative to itself
        if part.path is not None and not part.path.is_absolute():
            part.path = Path(folder).resolve() / part.path
    return config


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key}: adapter has {saved.get(key)!r}, model has {current.get(key)!r}"
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key) != current.get(key)
    ]


def load_adapter(model: LlamaAdapterV2, folder: Path | str) -> LlamaAdapterV2:
    """Load adapter weights saved by :func:`save_adapter` into ``model`` (in place, exact)."""
    folder = Path(folder)
    meta = read_adapter_meta(folder)
    if problems := _differences(meta["base"], base_identity(model.base.config)):
        raise AdapterMismatchError(
            f"{folder}: adapter was trained on another base model: " + "; ".join(problems)
        )
    saved_adapter = AdapterConfig.model_validate(meta["adapter"]).model_dump(mode="json")
    if problems := _differences(saved_adapter, model.adapter_config.model_dump(mode="json")):
        raise AdapterMismatchError(
            f"{folder}: adapter config differs from the model's: " + "; ".join(problems)
        )
    device = model.adapter_named_parameters()[0][1].device  # not adapter_state_dict: it gathers
    with safe_open(folder / WEIGHTS_FILE, framework="pt", device=str(device)) as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    model.load_adapter_state_dict(state)
    return model
