"""Generation: the KV cache with prompts computed once per call equals full recomputation."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from tiny_models import image_batch, move_gates, tiny_config, token_batch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.build import build_model

NEW_TOKENS = 6
GREEDY = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "pad_token_id": 0}


@pytest.fixture(scope="module")
def model() -> LlamaAdapterV2:
    torch.manual_seed(0)
    adapted = build_model(tiny_config()).eval()
    move_gates(adapted)
    return adapted


def _recompute_greedy(
    model: LlamaAdapterV2, tokens: torch.Tensor, images: torch.Tensor | None
) -> torch.Tensor:
    """Greedy decoding that runs the whole sequence through ``forward`` at every step."""
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(tokens, images=images).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_cached_greedy_equals_recomputing_every_step(model: LlamaAdapterV2, with_image: bool) -> None:
    tokens = token_batch(length=7)
    images = image_batch() if with_image else None
    cached = model.generate(tokens, images=images, attention_mask=torch.ones_like(tokens), **GREEDY)
    assert torch.equal(cached, _recompute_greedy(model, tokens, images))


def test_image_changes_what_is_generated(model: LlamaAdapterV2) -> None:
    tokens = token_batch(length=7)
    mask = torch.ones_like(tokens)
    outputs = {
        seed: model.generate(tokens, images=image_batch(seed=seed), attention_mask=mask, **GREEDY)
        for seed in (0, 1)
    }
    text_only = model.generate(tokens, attention_mask=mask, **GREEDY)
    assert not torch.equal(outputs[0], text_only) or not torch.equal(outputs[1], text_only)


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_left_padded_batch_with_cache_equals_without(model: LlamaAdapterV2, extra: dict[str, int]) -> None:
    tokens = token_batch(length=8)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    images = image_batch()
    cached = model.generate(tokens, images=images, attention_mask=mask, **GREEDY, **extra)
    recomputed = model.generate(
        tokens, images=images, attention_mask=mask, use_cache=False, **GREEDY, **extra
    )
    assert torch.equal(cached, recomputed)


def test_generate_leaves_no_prompt_state_behind(model: LlamaAdapterV2) -> None:
    """After a call with an image, a plain forward of the base sees no prompts at all."""
    tokens = token_batch(length=5)
    model.generate(tokens, images=image_batch(), attention_mask=torch.ones_like(tokens), **GREEDY)
    assert not model.base._forward_pre_hooks


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a region runs (the real kernels, nothing replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_gate_and_per_head_prompts_are_computed_once_per_call_not_per_step(
    model: LlamaAdapterV2, extra: dict[str, int]
) -> None:
    """tanh(gate) runs once per prompted layer for the whole call (it ran once per step before)."""
    tokens = token_batch(length=7)
    prompted = len(model.prompt_states(None, tokens.shape[0]))
    assert prompted == 2  # text only: the two adaptation-prompt layers
    with _OpCounter() as counter:
        model.generate(tokens, attention_mask=torch.ones_like(tokens), **GREEDY, **extra)
    assert counter.calls["aten.tanh"] == prompted


def test_training_forward_still_takes_the_gate_gradient(model: LlamaAdapterV2) -> None:
    """With autograd the per-head prompts are rebuilt in every forward: the gate gets its gradient."""
    tokens = token_batch(length=7)
    gates = [attention.gate for attention in model.prompted_attentions() if attention.source == "adaptation"]
    model.zero_grad(set_to_none=True)
    model(tokens, labels=tokens).loss.backward()
    assert len(gates) == 2
    assert all(gate.grad is not None and bool(gate.grad.abs().sum() > 0) for gate in gates)
    model.zero_grad(set_to_none=True)
