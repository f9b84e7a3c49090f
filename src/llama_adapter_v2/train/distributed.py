"""torch.distributed set-up for ``torchrun``: gloo on CPU, NCCL on GPU, DDP.

One process per device; ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK. Without them the
run is a single process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llama_adapter_v2.config.schema import TrainingConfig


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device_for(training: TrainingConfig, local_rank: int) -> torch.device:
    wants_cuda = training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("training.device is cuda but torch sees no CUDA device")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(training: TrainingConfig) -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a 1-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(training, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = training.distributed.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_for_training(module: nn.Module, ctx: DistContext, training: TrainingConfig) -> nn.Module:
    """DDP with find_unused_parameters: a text-only batch never touches the visual path.

    FSDP is refused with a clear message: torch's FSDP needs an accelerator, and sharded
    parameters would need full-state gathering for the per-group clipping and adapter
    checkpoints, which this engine does not do yet.
    """
    if training.distributed.strategy == "fsdp":
        raise NotImplementedError(
            "training.distributed.strategy=fsdp is not supported yet (sharded adapter checkpoints and "
            "per-group clipping are not implemented; torch's FSDP also needs a GPU); use ddp"
        )
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
