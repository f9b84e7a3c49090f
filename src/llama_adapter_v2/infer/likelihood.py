"""How likely the model finds each continuation of one prompt (scoring without free generation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llama_adapter_v2.infer.generation import prompt_ids
from llama_adapter_v2.model.adapter import LlamaAdapterV2


@torch.no_grad()
def continuation_log_likelihoods(
    model: LlamaAdapterV2, tokenizer: Any, prompt: str, continuations: Sequence[str]
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation after ``prompt``, in one batch."""
    context = prompt_ids(tokenizer, prompt)
    tails = [tokenizer.encode(text, add_special_tokens=False) for text in continuations]
    rows = [context + tail for tail in tails]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):  # right padding: positions stay those of the lone sequence
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    device = next(model.parameters()).device
    logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = []
    for index, tail in enumerate(tails):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(tail), device=device)
        targets = torch.tensor(tail, device=device)
        scores.append((float(log_probs[index, positions, targets].sum()), len(tail)))
    return scores
