"""The output-form bias + scale node: exact gradients in every frozen/trainable combination.

``ScaledBias`` replaces autograd's two-node graph of ``addcmul(s * b, y, s)`` with one node whose
backward reduces the gradient for ``s`` and ``b`` in two passes; these tests check it against
finite differences (float64 gradcheck) and against the autograd graph it replaces.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from llama_adapter_v2.model.adapter_linear import AdaptedLinear, ScaledBias

SHAPES = [(5, 3), (2, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("needs", [n for n in itertools.product([True, False], repeat=3) if any(n)])
def test_gradcheck_in_float64_for_every_trainable_combination(
    shape: tuple[int, ...], needs: tuple[bool, bool, bool]
) -> None:
    gen = torch.Generator().manual_seed(0)
    width = shape[-1]
    y, scale, bias = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (shape, (width,), (width,)))
    inputs = tuple(t.requires_grad_(n) for t, n in zip((y, scale, bias), needs, strict=True))
    assert torch.autograd.gradcheck(ScaledBias.apply, inputs)


def _twin_layers(frozen_bias: bool, lora_rank: int) -> tuple[AdaptedLinear, nn.Linear]:
    torch.manual_seed(0)
    frozen = nn.Linear(6, 5, bias=frozen_bias).requires_grad_(False)
    layer = AdaptedLinear(frozen, bias=True, scale_position="output", lora_rank=lora_rank)
    with torch.no_grad():
        assert layer.bias is not None and layer.scale is not None
        layer.bias.normal_()
        layer.scale.normal_()
        if layer.lora_b is not None:
            layer.lora_b.normal_()
    return layer, frozen


def _reference(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    """The autograd graph the node replaces: s * (W x + lora(x) + b_frozen + b)."""
    assert layer.scale is not None and layer.bias is not None
    y = nn.functional.linear(x, layer.frozen.weight)
    if layer.lora_a is not None:
        y = y + layer._lora(x)
    bias = layer.bias if layer.frozen.bias is None else layer.frozen.bias + layer.bias
    return torch.addcmul(layer.scale * bias, y, layer.scale)


@pytest.mark.parametrize(("frozen_bias", "lora_rank"), [(False, 0), (True, 0), (True, 2)])
@pytest.mark.parametrize("trainable", ["all", "bias_only", "scale_only", "none"])
def test_adapted_linear_gradients_match_the_autograd_graph_it_replaces(
    frozen_bias: bool, lora_rank: int, trainable: str
) -> None:
    layer, _ = _twin_layers(frozen_bias, lora_rank)
    assert layer.scale is not None and layer.bias is not None
    layer.scale.requires_grad_(trainable in ("all", "scale_only"))
    layer.bias.requires_grad_(trainable in ("all", "bias_only"))
    x = torch.randn(3, 4, 6, requires_grad=True)  # 3-D, as inside the decoder
    pieces = (layer.scale, layer.bias, layer.lora_a, layer.lora_b)
    params = [p for p in pieces if p is not None and p.requires_grad]
    upstream = torch.randn(3, 4, 5)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "ScaledBiasBackward"
    ours = torch.autograd.grad(out, [x, *params], upstream)
    theirs = torch.autograd.grad(_reference(layer, x), [x, *params], upstream)
    assert torch.equal(out, _reference(layer, x))  # the forward is the same expression, bit for bit
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_no_grad_input_and_frozen_scale_and_bias_build_no_graph() -> None:
    layer, _ = _twin_layers(frozen_bias=False, lora_rank=0)
    layer.requires_grad_(False)
    out = layer(torch.randn(2, 6))
    assert out.grad_fn is None and not out.requires_grad


def test_input_not_needing_grad_still_gives_scale_and_bias_gradients() -> None:
    layer, _ = _twin_layers(frozen_bias=False, lora_rank=0)
    assert layer.scale is not None and layer.bias is not None
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    layer(x).sum().backward()
    weight = layer.frozen.weight
    y = weight[:, :2].T  # W x for the two one-hot rows
    # g = 1 everywhere: g_b = s * 2 tokens, g_s = colsum(y) + 2 b
    torch.testing.assert_close(layer.bias.grad, 2 * layer.scale.detach())
    torch.testing.assert_close(layer.scale.grad, y.sum(0) + 2 * layer.bias.detach())


def test_under_bf16_autocast_dtypes_follow_the_autograd_graph() -> None:
    layer, _ = _twin_layers(frozen_bias=False, lora_rank=0)
    x = torch.randn(2, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), _reference(layer, x)
    assert out.dtype == ref.dtype == torch.float32  # bf16 GEMM output promoted by the fp32 scale
    assert torch.equal(out, ref)
    upstream = torch.randn_like(out)
    params = [x, layer.scale, layer.bias]
    ours = torch.autograd.grad(out, params, upstream)
    theirs = torch.autograd.grad(ref, params, upstream)
    for mine, theirs_one in zip(ours, theirs, strict=True):
        assert mine.dtype == theirs_one.dtype == torch.float32
        torch.testing.assert_close(mine, theirs_one, rtol=2e-2, atol=2e-2)
