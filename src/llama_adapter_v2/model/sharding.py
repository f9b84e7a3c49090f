"""Whole tensors in and out of FSDP2 shards: the one place that knows about DTensors.

The model's adapter state and the trainer's optimizer state both hold whole tensors, so a
checkpoint loads in any world size; a parameter that FSDP2 sharded is a DTensor.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` split as ``reference`` is: this rank's shard of a DTensor parameter, else ``full``.

    Every rank holds the whole tensor (read from the checkpoint), so each takes its own chunk
    and nothing is communicated.
    """
    if not isinstance(reference, DTensor) or full.shape != reference.shape:
        return full
    local = full.to(device=reference.device)
    return distribute_tensor(local, reference.device_mesh, reference.placements, src_data_rank=None)
