"""The held-out loss: token-weighted mean cross-entropy over a task's whole held-out split.

Training logs it on its cadence (every rank takes its slice; the sums are added across ranks)
and evaluation reports it; both call this, with the same loader settings as training's batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.formatting import IGNORE_INDEX
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.records import Kind
from llama_adapter_v2.data.shards import make_loader
from llama_adapter_v2.model.adapter import LlamaAdapterV2

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def supervised_tokens(labels: torch.Tensor) -> int:
    """Positions the loss counts: labels shifted by one, padding and prompt (-100) left out."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def holdout_loss_sums(
    model: LlamaAdapterV2, tokenizer: Any, cfg: Config, task: Kind, *, device: torch.device,
    autocast: Autocast = contextlib.nullcontext, rank: int = 0, world_size: int = 1,
) -> torch.Tensor:
    """[sum of loss x supervised tokens, supervised tokens] (float64) over this rank's share of
    ``task``'s held-out split. Rows without an image get no visual prompts (docs/METHOD.md §3).
    Every sample counts, whatever ``training.multimodal_instructions`` says: the same yardstick
    for all runs."""
    loader = make_loader(
        DataPaths(cfg.data.work_dir).split(task, "holdout"), tokenizer=tokenizer,
        batch_size=cfg.training.batch_size, max_tokens=cfg.training.max_tokens(task),
        image_transform=model.image_transform, seed=cfg.training.seed, epoch=0, rank=rank,
        world_size=world_size, num_workers=cfg.data.shards.loader_workers,
    )
    total = torch.zeros(2, dtype=torch.float64)
    for raw in loader:
        batch = to_device(raw, device)
        with autocast():
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], images=batch["images"], image_mask=batch["has_image"]).loss
        tokens = supervised_tokens(batch["labels"])
        total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    return total


def mean_loss(sums: torch.Tensor) -> float:
    return float(sums[0] / sums[1].clamp(min=1))
