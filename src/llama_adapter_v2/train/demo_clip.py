"""The demo's frozen vision tower: a tiny CLIP trained contrastively on the demo's image-caption pairs.

Real runs load a contrastively pretrained CLIP, whose tokens already say what an image holds;
the adapter's visual path only has to translate them. A random tower keeps colour in its
tokens but hardly the shape or the layout, and a frozen tower cannot learn them later. This
demo-only stage, the vision twin of ``demo-base``, trains ``cfg.model.vision.arch`` with a
tiny text tower under CLIP's symmetric contrastive loss on the training split's captions
(never the held-out images), and saves a transformers ``CLIPModel`` folder (with its text
tokenizer) at ``cfg.model.vision.path``. The adapter then loads the vision tower and its
projection from that folder as it would load ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import Progress
from transformers import CLIPConfig, CLIPModel

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION
from llama_adapter_v2.data.tokenizer import train_tokenizer
from llama_adapter_v2.model.vision import ClipImageTransform
from llama_adapter_v2.train.demo_base import demo_records
from llama_adapter_v2.train.optim import WarmupHalfCosine

# The text tower pools at its end token; transformers treats an end-token id of 2 as a legacy
# CLIP config (pooling at the largest id), so the CLIP tokenizer puts its end token at id 3.
CLIP_SPECIAL_TOKENS = {
    "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
}


@dataclass(frozen=True)
class DemoClipResult:
    path: Path
    losses: list[float]
    accuracies: list[float]
    seconds: float
    n_images: int
    n_captions: int


@dataclass(frozen=True)
class ImageCaptions:
    """The pixels of one training image (CLIP-normalised) and every caption it has."""

    pixels: torch.Tensor
    captions: list[list[int]]


def training_pairs(cfg: Config, tokenizer: Any, transform: Any) -> list[ImageCaptions]:
    """The training split's caption records grouped by image (held-out images never enter)."""
    by_image: dict[str, list[str]] = {}
    for record in demo_records(cfg, split="train"):
        if record.kind == "caption" and record.image is not None:
            by_image.setdefault(record.image, []).append(record.response)
    settings = cfg.training.demo_clip
    pairs = []
    for path, captions in sorted(by_image.items()):
        with Image.open(path) as raw:
            pixels = transform(raw.convert("RGB"))
        encoded = [_caption_ids(text, tokenizer, settings.max_tokens) for text in captions]
        pairs.append(ImageCaptions(pixels, encoded))
    return pairs


def _caption_ids(text: str, tokenizer: Any, max_tokens: int) -> list[int]:
    """BOS + text + EOS, cut to ``max_tokens`` with the end token kept (the text tower pools there)."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    return [*ids[: max_tokens - 1], tokenizer.eos_token_id]


def _batch(pairs: list[ImageCaptions], chosen: list[int], rng: random.Random, pad_id: int):
    """Distinct images, one of each image's captions drawn at random: a contrastive batch."""
    captions = [rng.choice(pairs[i].captions) for i in chosen]
    width = max(len(c) for c in captions)
    ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, : len(caption)] = torch.tensor(caption)
        mask[row, : len(caption)] = 1
    pixels = torch.stack([pairs[i].pixels for i in chosen])
    return ids, mask, pixels


def build_clip_model(cfg: Config, tokenizer: Any) -> Any:
    """A ``CLIPModel`` whose vision tower is ``model.vision.arch`` and whose text tower is tiny."""
    vision = cfg.model.vision.arch
    if vision is None:
        raise ValueError("model.vision.arch: the demo CLIP stage needs the tower's shape to train it")
    settings = cfg.training.demo_clip
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": settings.text_hidden_size,
        "intermediate_size": 2 * settings.text_hidden_size, "num_hidden_layers": settings.text_layers,
        "num_attention_heads": settings.text_heads, "max_position_embeddings": settings.max_tokens,
        "projection_dim": vision.projection_dim, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = vision.model_dump(exclude={"projection_dim"})
    config = CLIPConfig(text_config=text_config, vision_config=vision_config,
                        projection_dim=vision.projection_dim)
    return CLIPModel(config)


def _optimizer(model: Any, settings: Any) -> torch.optim.Optimizer:
    """AdamW as CLIP trains it: decay on matrices only, betas (0.9, 0.98)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-6,
    )


def _contrastive_steps(
    model: Any, pairs: list[ImageCaptions], settings: Any, pad_id: int
) -> tuple[list[float], list[float]]:
    """Run the steps; returns the loss and the in-batch image-to-caption accuracy of each."""
    batch_size = min(settings.batch_size, len(pairs))
    rng = random.Random(settings.seed)
    optimizer = _optimizer(model, settings)
    schedule = WarmupHalfCosine(peak=settings.lr, warmup=settings.warmup_steps, total=settings.steps)
    losses: list[float] = []
    accuracies: list[float] = []
    order: list[int] = []
    model.train()
    with Progress(transient=True) as progress:
        task = progress.add_task("training the demo CLIP", total=settings.steps)
        for step in range(settings.steps):
            if len(order) < batch_size:  # every image once per epoch, in a fresh order
                fresh = list(range(len(pairs)))
                rng.shuffle(fresh)
                order.extend(fresh)
            chosen, order = order[:batch_size], order[batch_size:]
            ids, mask, pixels = _batch(pairs, chosen, rng, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
            losses.append(float(output.loss.detach()))
            hits = output.logits_per_image.argmax(dim=1) == torch.arange(len(chosen))
            accuracies.append(float(hits.float().mean()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"demo-clip: loss became {losses[-1]} at step {step}")
            progress.update(task, advance=1, description=f"demo CLIP  loss {losses[-1]:.3f}")
    return losses, accuracies


def train_demo_clip(cfg: Config) -> DemoClipResult:
    """Train the tiny CLIP on the training split's image-caption pairs; write it atomically."""
    vision = cfg.model.vision
    if vision.path is None or vision.arch is None:
        raise ValueError(
            "model.vision needs both `path` (where to write) and `arch` (what to train) for demo-clip"
        )
    settings = cfg.training.demo_clip
    started = time.perf_counter()
    staging = vision.path.with_name(f".tmp-{vision.path.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    captions = [r.response for r in demo_records(cfg, split="train") if r.kind == "caption"]
    if not captions:
        raise ValueError("demo-clip: the training split holds no caption with an image")
    tokenizer = train_tokenizer([*captions, CAPTION_INSTRUCTION], settings.text_vocab_size, staging,
                                special_tokens=CLIP_SPECIAL_TOKENS)
    pairs = training_pairs(cfg, tokenizer, ClipImageTransform(vision.arch.image_size))
    if len(pairs) < 2:
        raise ValueError(f"demo-clip: {len(pairs)} training image(s); contrastive training needs two or more")
    torch.manual_seed(settings.seed)
    model = build_clip_model(cfg, tokenizer)
    losses, accuracies = _contrastive_steps(model, pairs, settings, tokenizer.pad_token_id)
    model.eval()
    model.save_pretrained(staging)
    if vision.path.exists():
        shutil.rmtree(vision.path)
    staging.rename(vision.path)
    return DemoClipResult(vision.path, losses, accuracies, time.perf_counter() - started, len(pairs),
                          len(captions))
