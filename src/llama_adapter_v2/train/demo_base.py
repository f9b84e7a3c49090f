"""The demo's frozen base: a tiny Llama and its tokenizer trained on the demo text.

LLaMA-Adapter assumes a base that already speaks the language; a randomly initialised base
would leave the adapter to learn language from scratch through a few prompts and biases.
This demo-only stage trains ``cfg.model.base.arch`` as a causal LM on the demo text of the
training split as plain prose (captions, instructions with their answers, conversation turns;
no prompt template, every token learned), like a pretrained base that has read the language
but never seen the instruction format: following the template is left to the adapter. Beside
that text it reads ``reading_texts`` generated scenes in words, each followed by a question it
answers or a caption that restates it: a pretrained LLM's habit of saying back what its context
holds, without which no prompt, visual or learned, steers the base to a colour. The
tokenizer is trained on the templated texts so the template tokenizes compactly. The stage
saves a transformers folder (model + tokenizer) at ``cfg.model.base.path``. It is a DVC
stage with a cached output, so it runs once per data/code version.
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
from rich.progress import Progress
from transformers import LlamaConfig, LlamaForCausalLM

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.demo import reading_tasks
from llama_adapter_v2.data.formatting import segments
from llama_adapter_v2.data.readers import read_coco, read_instructions
from llama_adapter_v2.data.records import Record, Turn
from llama_adapter_v2.data.shards import split_of
from llama_adapter_v2.data.tokenizer import train_tokenizer
from llama_adapter_v2.train.optim import WarmupHalfCosine


@dataclass(frozen=True)
class DemoBaseResult:
    path: Path
    losses: list[float]
    seconds: float
    n_texts: int


def demo_records(cfg: Config, split: str | None = None) -> list[Record]:
    """Readable records of the configured sources in file order (bad ones are left out).

    ``split="train"`` keeps only what the shard split puts in training, so the base never
    sees the held-out text the adapter is later scored on.
    """
    raw = [r for source in cfg.data.captions for r in read_coco(source)]
    raw += [r for source in cfg.data.instructions for r in read_instructions(source)]
    records = []
    for item in raw:
        if item.problems or any(text is None for _, text in item.turns):
            continue
        record = item.to_record()
        if split is None or split_of(record.split_key, cfg.data.holdout_fraction) == split:
            records.append(record)
    return records


def reading_records(seed: int, count: int) -> list[Record]:
    """``training.demo_base.reading_texts`` generated reading tasks as records of the base's corpus."""
    return [
        Record(id=f"demo-reading:{index}", source="demo-reading", kind="instruction", template="alpaca",
               turns=(Turn("user", task["instruction"]), Turn("assistant", task["output"])),
               input=task["input"])
        for index, task in enumerate(reading_tasks(seed, count))
    ]


def templated_text(record: Record) -> str:
    """The record as the adapter will see it (prompt template included): the tokenizer's corpus."""
    return "".join(text for text, _ in segments(record))


def plain_text(record: Record) -> str:
    """The record's words without any template: the base LM's corpus."""
    parts = [record.turns[0].text, record.input, *(turn.text for turn in record.turns[1:])]
    return "\n".join(part for part in parts if part)


def _plain_ids(text: str, tokenizer: Any, max_tokens: int) -> list[int]:
    """BOS + text + EOS, cut to ``max_tokens`` with EOS kept last."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    return [*ids[: max_tokens - 1], tokenizer.eos_token_id]


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches of (input_ids, attention_mask, labels) with right padding."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(sequences)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(sequences[i]) for i in chosen)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, index in enumerate(chosen):
            seq = torch.tensor(sequences[index])
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels


def train_demo_base(cfg: Config, records: list[Record] | None = None) -> DemoBaseResult:
    """Train tokenizer + tiny Llama on the demo text; write them atomically to the base path."""
    base = cfg.model.base
    if base.path is None or base.arch is None:
        raise ValueError(
            "model.base needs both `path` (where to write) and `arch` (what to train) for demo-base"
        )
    settings = cfg.training.demo_base
    records = demo_records(cfg, split="train") if records is None else records
    if not records:
        raise ValueError("demo-base: the configured data sources hold no readable record")
    records = records + reading_records(settings.seed, settings.reading_texts)
    started = time.perf_counter()
    staging = base.path.with_name(f".tmp-{base.path.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = train_tokenizer((templated_text(r) for r in records), base.arch.vocab_size, staging)
    sequences = [_plain_ids(plain_text(r), tokenizer, settings.max_tokens) for r in records]

    torch.manual_seed(settings.seed)
    arch = base.arch.model_dump()
    model = LlamaForCausalLM(
        LlamaConfig(
            **arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = WarmupHalfCosine(peak=settings.lr, warmup=settings.warmup_steps, total=settings.steps)
    batches = _batches(sequences, settings.batch_size, tokenizer.pad_token_id, random.Random(settings.seed))
    losses: list[float] = []
    model.train()
    with Progress(transient=True) as progress:
        task = progress.add_task("training the demo base LM", total=settings.steps)
        for step in range(settings.steps):
            ids, mask, labels = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"demo-base: loss became {losses[-1]} at step {step}")
            progress.update(task, advance=1, description=f"demo base LM  loss {losses[-1]:.3f}")
    model.eval()
    model.save_pretrained(staging)
    if base.path.exists():
        shutil.rmtree(base.path)
    staging.rename(base.path)
    return DemoBaseResult(base.path, losses, time.perf_counter() - started, len(records))
