"""Optimizer and RNG state as safetensors tensors plus JSON, so checkpoints never need pickle.

``torch.optim`` state dicts mix tensors (moments, step counters) with plain values (betas,
lr); the tensors go to a flat ``{key: tensor}`` map and the rest to JSON. RNG states: torch's
are uint8 tensors, numpy's and Python's are tuples of ints, which JSON holds exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from llama_adapter_v2.model.sharding import full_tensor, shard_like

TensorMap = dict[str, torch.Tensor]


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[TensorMap, dict[str, Any]]:
    """Split an optimizer's state dict into tensors (keyed under ``prefix``) and JSON.

    Moments of FSDP2-sharded parameters are gathered whole (a collective), so the file is the
    same whatever the world size that wrote it.
    """
    full = optimizer.state_dict()
    tensors: TensorMap = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in full["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/state/{index}/{name}"] = full_tensor(value)
            else:
                plain.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in full["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def restore_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: TensorMap, saved: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state`; each rank keeps its shard of a sharded parameter's moments."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    marker = f"{prefix}/state/"
    for key, value in tensors.items():
        if key.startswith(marker):
            index, name = key[len(marker):].split("/", 1)
            state.setdefault(int(index), {})[name] = shard_like(params[int(index)], value)
    for index, values in saved["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[TensorMap, dict[str, Any]]:
    """Every RNG training touches: torch (CPU and each CUDA device), numpy, Python."""
    tensors: TensorMap = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = cuda_state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, plain


def restore_rng(tensors: TensorMap, plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda_keys = [k for k in tensors if k.startswith("rng/cuda/")]
    cuda_states = sorted(cuda_keys, key=lambda k: int(k.split("/")[-1]))
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_states])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
