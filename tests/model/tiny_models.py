"""Tiny models for the model tests: 4-layer Llama (width 64, grouped-query attention) and a
1-layer CLIP tower at 32 px. Built from ``arch`` (seeded random weights) in fp32."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from llama_adapter_v2.config import Config, validate_config
from llama_adapter_v2.model.adapter import LlamaAdapterV2

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
TINY_CLIP: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "projection_dim": 48,
}
TINY_ADAPTER: dict[str, Any] = {
    "prompt_len": 3,
    "prompt_layers": 2,
    "visual_layers": 1,
    "visual": {"n_query": 3, "width": 32, "n_blocks": 1, "n_heads": 2},
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny_config(
    adapter: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    root: Path = Path("/nonexistent-root"),
) -> Config:
    """A validated tiny config; ``adapter`` and ``base`` update the defaults above."""
    raw = {
        "name": "tiny",
        "model": {
            "base": _merge({"arch": TINY_LLAMA, "attn_implementation": "sdpa"}, base or {}),
            "vision": {"arch": TINY_CLIP},
            "adapter": _merge(TINY_ADAPTER, adapter or {}),
        },
        "training": {"caption_ratio": 0.5},
        "data": {"demo": {}},
    }
    return validate_config(raw, Path("tiny.yaml"), root=root)


def move_gates(model: LlamaAdapterV2, seed: int = 1) -> None:
    """Give every gate a clearly non-zero value (as training would after a few steps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attention in model.prompted_attentions():
            attention.gate.copy_(torch.randn(attention.gate.shape, generator=generator) + 1.0)


def perturb_adapter(model: LlamaAdapterV2, seed: int = 2) -> None:
    """Move every adapter parameter off its initial value (bias, scale, norms, LoRA, gates...)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.adapter_named_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def token_batch(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        3, TINY_LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def image_batch(batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = TINY_CLIP["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
