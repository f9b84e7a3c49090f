"""Activation checkpointing of the frozen Llama's decoder layers: same gradients, really recomputed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny_models import TINY_LLAMA, image_batch, perturb_adapter, tiny_config, token_batch

from llama_adapter_v2.model.adapter import IGNORE_INDEX, LlamaAdapterV2
from llama_adapter_v2.model.build import build_model

BATCH = 3


def _adapted(adapter: dict | None = None) -> LlamaAdapterV2:
    """Images, early visual prompts and adaptation prompts, every adapter parameter moved off its
    initial value (gates included) so that every gradient is non-trivial."""
    model = build_model(tiny_config(adapter))
    perturb_adapter(model)
    return model.train()


def _loss(model: LlamaAdapterV2) -> torch.Tensor:
    ids = token_batch(BATCH, 11)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt part, as in instruction data
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0  # a padded row
    labels[2, -3:] = IGNORE_INDEX
    has_image = torch.tensor([True, False, True])  # a mixed batch: one text-only row
    images = image_batch(BATCH)
    return model(ids, attention_mask=mask, labels=labels, images=images, image_mask=has_image).loss


def _gradients(model: LlamaAdapterV2) -> dict[str, torch.Tensor]:
    for _, parameter in model.adapter_named_parameters():
        parameter.grad = None
    _loss(model).backward()
    return {name: parameter.grad.clone() for name, parameter in model.adapter_named_parameters()
            if parameter.grad is not None}


@pytest.mark.parametrize("adapter", [None, {"visual_fusion": "additive", "visual_layers": 0, "lora_rank": 2}],
                         ids=["early", "additive+lora"])
def test_checkpointing_gives_the_same_gradient_to_every_adapter_parameter(adapter: dict | None) -> None:
    model = _adapted(adapter)
    plain = _gradients(model)
    model.enable_activation_checkpointing()
    checkpointed = _gradients(model)
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == len(model.adapter_named_parameters())  # every one of them has a gradient
    for name, gradient in plain.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-6, atol=1e-7, msg=name)


@contextmanager
def _counting_mlp_calls(model: LlamaAdapterV2) -> Iterator[list[int]]:
    """Calls of every layer's MLP ``forward``. Not a forward hook: module hooks do not fire in the
    checkpoint's recomputation (measured with torch 2.13), the forward itself does."""
    calls = [0]
    mlps = [layer.mlp for layer in model.base.model.layers]

    def counted(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward_counted(*args: object) -> torch.Tensor:
            calls[0] += 1
            return forward(*args)
        return forward_counted

    for mlp in mlps:
        mlp.forward = counted(mlp.forward)
    try:
        yield calls
    finally:
        for mlp in mlps:
            del mlp.forward


@contextmanager
def _saved_bytes() -> Iterator[list[int]]:
    """Bytes autograd keeps for the backward outside checkpointed regions (inside, the
    checkpoint's own hooks keep nothing but a placeholder)."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def test_checkpointing_recomputes_each_layer_in_the_backward_and_keeps_less() -> None:
    model = _adapted()
    layers = TINY_LLAMA["num_hidden_layers"]
    measured = {}
    for checkpointed in (False, True):
        if checkpointed:
            model.enable_activation_checkpointing()
        with _counting_mlp_calls(model) as calls, _saved_bytes() as saved:
            loss = _loss(model)
            forward_calls = calls[0]
            loss.backward()
        measured[checkpointed] = (forward_calls, calls[0], saved[0])
    assert measured[False][:2] == (layers, layers)  # no layer runs in the backward
    assert measured[True][:2] == (layers, 2 * layers)  # every layer runs again in the backward
    assert measured[True][2] < measured[False][2] / 2


def test_checkpointing_is_off_without_gradients_and_in_generation() -> None:
    model = _adapted()
    model.enable_activation_checkpointing()
    with _counting_mlp_calls(model) as calls, torch.no_grad():
        model(token_batch(BATCH, 7))
    assert calls[0] == TINY_LLAMA["num_hidden_layers"]
    new = model.eval().generate(token_batch(1, 5), images=image_batch(1), max_new_tokens=3, do_sample=False)
    assert new.shape[1] == 8
