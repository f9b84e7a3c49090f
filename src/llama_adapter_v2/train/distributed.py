"""torch.distributed set-up for ``torchrun``: gloo on CPU, NCCL on GPU, DDP or FSDP2.

One process per device; ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK. Without them the
run is a single process and nothing here touches torch.distributed.

``training.distributed.strategy`` picks how the ranks share the model:

* ``ddp``: every rank holds the whole model; gradients are all-reduced.
* ``fsdp``: FSDP2 (``fully_shard``): every frozen and trainable weight is a DTensor sharded
  over the ranks (dim 0), so a base too big for one device is split across them. A unit is
  gathered only around its own forward and backward. The units are each decoder layer's MLP
  and its attention projections, then the whole model as root (embeddings, head, norms,
  prompts, gates, the visual bridge and the CLIP tower: the root stays gathered through the
  step). Not whole decoder layers: the prompt keys and values of every adapted layer are
  computed once per forward by the model's root (model/adapter.py ``prompt_states``) through
  that layer's ``k_proj``/``v_proj`` and its ``prompt``, outside the layer's own forward;
  called as modules, the projections gather themselves wherever they run. Checkpoints always
  hold whole tensors (``model/sharding.py`` gathers and splits them), so they load
  in any world size.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

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
        # a collective that waits longer than this raises, so the rank exits and torchrun stops the job
        timeout = timedelta(seconds=training.distributed.timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# A rank still tearing down after this long dumps every thread's stack and exits with status 1.
TEARDOWN_TIMEOUT_S = 120


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group once nothing else holds it, under a watchdog.

    DDP's reducer holds the group from C++: freed after the group left torch.distributed, it
    was the group's last holder, and ``~ProcessGroupGloo`` joined gloo's worker threads with
    the GIL held while a worker waited for the GIL to free the tensors of the last collective:
    a deadlock (about one run in four on a busy machine; rank 0, slower at the end, got past it,
    so torchrun saw rank 0 done and rank 1 alive for ever). So the caller frees its model first,
    the garbage collector frees any cycle around it, and the group's last holder is then its
    Python object, whose destructor releases the GIL. The watchdog turns any other hang here
    into a failed rank with the stacks on stderr, which torchrun reports and stops the job for.
    """
    if not (ctx.distributed and dist.is_initialized()):
        return
    gc.collect()
    faulthandler.dump_traceback_later(TEARDOWN_TIMEOUT_S, exit=True)
    try:
        dist.destroy_process_group()
        gc.collect()
    finally:
        faulthandler.cancel_dump_traceback_later()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_for_training(module: nn.Module, ctx: DistContext, training: TrainingConfig) -> nn.Module:
    """``module`` is the trainer's LossOf: DDP around it, or FSDP2 sharding of its ``model``.

    DDP runs with find_unused_parameters: a text-only batch never touches the visual path.
    One process gets the module as it is under either strategy.
    """
    if not ctx.distributed:
        return module
    if training.distributed.strategy == "fsdp":
        shard_model(module.model, ctx)  # type: ignore[arg-type]  # LossOf.model
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


# --------------------------------------------------------------------------- FSDP2


def shard_units(model: Any) -> list[nn.Module]:
    """The FSDP2 units under the root; see the module docstring for what stays in the root.

    A unit's forward all-gathers it, so every rank must run the same units the same number of
    times. A text-only batch skips the CLIP tower and the visual layers' prompt projections on
    one rank while an image batch runs them on another: those stay whole in the root unit.
    """
    units: list[nn.Module] = []
    for layer in model.base.model.layers:
        attention = layer.self_attn
        names = ["q_proj", "o_proj"]
        if getattr(attention, "source", None) != "visual":
            names += ["k_proj", "v_proj"]
        units += [layer.mlp] + [getattr(attention, name) for name in names]
    return units


def shard_model(model: nn.Module, ctx: DistContext) -> None:
    """fully_shard every unit, then the model as root (in place; parameters become DTensors)."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _sharded_root(module: nn.Module) -> Any:
    inner = getattr(module, "model", module)
    return inner if isinstance(inner, FSDPModule) else None


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: ``enabled=False`` keeps its gradients local.

    DDP: ``no_sync``. FSDP2: ``set_requires_gradient_sync(False)``, read in the backward, so
    the backward must run inside this block. One process: nothing to skip.
    """
    if enabled:
        yield
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    root = _sharded_root(module)
    if root is None:
        yield
        return
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def reshard(module: nn.Module) -> None:
    """Free gathered weights: the FSDP2 root stays gathered after a no-grad forward."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()

