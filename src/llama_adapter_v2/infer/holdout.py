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


@torch.no_grad()
def image_control_losses(
    model: LlamaAdapterV2, tokenizer: Any, cfg: Config, word_groups: dict[str, list[str]], *,
    device: torch.device,
) -> dict[str, float]:
    """Held-out caption loss with each caption's own image and with another sample's image.

    The image's share of the caption loss is what a blind control leaves out: a visual path that
    carries nothing gives equal losses. ``word_groups`` ("colour": ["red", ...]) also splits the
    losses by the word predicted, so a model that learns a caption's wording from the image but
    not what is drawn shows it (those words' loss stays at the shuffled one). Words that are not
    one token after a space are left out of their group. The other image is the next sample's in
    the batch (a batch of one keeps its image and is skipped).
    """
    token_group = _single_token_groups(tokenizer, word_groups)
    loader = make_loader(
        DataPaths(cfg.data.work_dir).split("caption", "holdout"), tokenizer=tokenizer,
        batch_size=cfg.training.batch_size, max_tokens=cfg.training.max_tokens("caption"),
        image_transform=model.image_transform, seed=cfg.training.seed, epoch=0,
    )
    sums: dict[tuple[str, bool], list[float]] = {}
    for raw in loader:
        batch = to_device(raw, device)
        if batch["images"] is None or batch["images"].shape[0] < 2:
            continue
        for shuffled in (False, True):
            images = batch["images"].roll(1, dims=0) if shuffled else batch["images"]
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], images=images)
            losses = torch.nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="none")
            for target, loss in zip(out.targets.tolist(), losses.tolist(), strict=True):
                for group in ("all", token_group.get(target)):
                    if group is not None:
                        total = sums.setdefault((group, shuffled), [0.0, 0])
                        total[0], total[1] = total[0] + loss, total[1] + 1
    metrics: dict[str, float] = {}
    for (group, shuffled), (total, count) in sorted(sums.items()):
        if group == "all":  # with its own image this is caption_loss, which holdout_loss_sums gives
            if shuffled:
                metrics["caption_loss_shuffled_image"] = total / count
            continue
        metrics[f"caption_loss_{group}_words" + ("_shuffled_image" if shuffled else "")] = total / count
    return metrics


def _single_token_groups(tokenizer: Any, word_groups: dict[str, list[str]]) -> dict[int, str]:
    groups: dict[int, str] = {}
    for group, words in word_groups.items():
        for word in words:
            ids = tokenizer.encode(f" {word}", add_special_tokens=False)
            if len(ids) == 1:
                groups[ids[0]] = group
    return groups
