"""The frozen base's decoder linears stored in 8 or 4 bits (``model.base.quantize``).

* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv 2305.14314) with double
  quantisation: blocks of 64 weights share one absmax; each weight is the index of the nearest
  of 16 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact zero), two to
  a byte; the absmaxes, less their mean, are themselves stored as int8 with one factor per
  block of up to 256. About 4.13 bits per weight.
* ``int8``: a symmetric per-output-channel int8 weight with one scale per row.

Plain torch, so both run wherever torch runs (CPU and CUDA). torchao's NF4Tensor computes the
same format, but installing torchao makes transformers import it on every model build
(about 94 MB and 1-3 s here, for every run, quantised or not), so the project keeps its own.

The weights stay quantised between calls: forward and backward each dequantise the weight
for one matmul, and autograd keeps the quantised module, never a dequantised copy (a plain
``F.linear(x, dequantised)`` would save the full-precision weight for the input gradient
and undo the saving). The weights never train, so no weight gradient is formed. Bias, scale,
LoRA and prompts (``AdaptedLinear``, ``PromptedLlamaAttention``) stay in the compute dtype
around these layers. The stored codes are frozen parameters, not buffers, so DDP broadcasts
them once at start and never before every forward.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

QuantizeKind = Literal["none", "int8", "nf4"]
NF4_BLOCK = 64  # weights per absmax (QLoRA's)
NF4_SCALER_BLOCK = 256  # absmaxes per int8 factor (QLoRA's), or the largest divisor of their count below it
INT8_LEVELS = 127
# The NormalFloat4 code: 2^4 quantiles of N(0, 1) normalised to [-1, 1], asymmetric so that 0 is exact.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored quantised; ``linear(x, bias)`` is ``x W^T + bias``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if bias is None else y + bias

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight this layer computes with, in ``dtype`` (default: the compute dtype)."""
        raise NotImplementedError

    def storage(self) -> list[nn.Parameter]:
        """The tensors that hold the quantised weight (the bias not among them)."""
        return [parameter for name, parameter in self.named_parameters(recurse=False) if name != "bias"]

    @property
    def device(self) -> torch.device:
        return self.storage()[0].device

    def extra_repr(self) -> str:
        biased = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={biased}"


class NF4Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach()
        if weight.numel() % (2 * NF4_BLOCK):
            raise ValueError(f"model.base.quantize: nf4 stores weights in blocks of {NF4_BLOCK}; "
                             f"a {tuple(weight.shape)} linear has {weight.numel()} weights")
        blocks = weight.float().reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        self.codes = _frozen((codes[:, 0::2] << 4) | codes[:, 1::2])  # two 4-bit codes per byte
        self.absmax_mean = _frozen(absmax.mean().reshape(1))
        centred = (absmax - self.absmax_mean).reshape(-1, _largest_divisor_up_to(absmax.numel(),
                                                                                  NF4_SCALER_BLOCK))
        factor = INT8_LEVELS / centred.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        self.absmax_codes = _frozen(torch.round(centred * factor[:, None]).to(torch.int8))
        self.absmax_factor = _frozen(factor)
        # byte b -> (levels[b >> 4], levels[b & 15]): one gather decodes both codes of a byte
        pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)
        self.register_buffer("level_pairs", pairs, persistent=False)

    def dequantized_absmax(self) -> torch.Tensor:
        """Each block's absmax as the double quantisation restores it, (n_blocks,) in float32."""
        return (self.absmax_codes.float() / self.absmax_factor[:, None]).flatten() + self.absmax_mean

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One gather of the level pairs (int32 byte indices, not int64 codes: a quarter of the
        transient memory and 2.6x faster on CPU than decoding each code) and one in-place scaling."""
        weight = torch.index_select(self.level_pairs, 0, self.codes.flatten().int()).view(-1, NF4_BLOCK)
        weight.mul_(self.dequantized_absmax()[:, None])
        return weight.view(self.out_features, self.in_features).to(dtype or self.compute_dtype)


class Int8Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_LEVELS
        self.codes = _frozen(torch.round(weight / scale[:, None]).to(torch.int8))
        self.row_scale = _frozen(scale)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.codes.float().mul_(self.row_scale[:, None]).to(dtype or self.compute_dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """``x W^T`` with ``W`` dequantised for the call, and again in the backward for ``grad W``.

    Under autocast the weight is dequantised in the autocast dtype (what the matmul would cast
    it to anyway).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.dtype = dtype
        return functional.linear(x.to(dtype), layer.dequantized_weight(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype) @ ctx.layer.dequantized_weight(ctx.dtype), None


QUANTIZED_LINEAR: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_linear(linear: nn.Linear, kind: QuantizeKind) -> nn.Linear | QuantizedLinear:
    """``linear`` itself for ``none``; otherwise its quantised replacement (the original can be freed)."""
    if kind == "none":
        return linear
    return QUANTIZED_LINEAR[kind](linear)


def factory_of(frozen: nn.Module) -> dict[str, Any]:
    """Device and compute dtype of a frozen linear, for the trainable tensors placed beside it."""
    if isinstance(frozen, QuantizedLinear):
        return {"device": frozen.device, "dtype": frozen.compute_dtype}
    assert isinstance(frozen, nn.Linear)
    return {"device": frozen.weight.device, "dtype": frozen.weight.dtype}


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(sub, QuantizedLinear) for sub in module.modules())


def _largest_divisor_up_to(n: int, limit: int) -> int:
    """The absmax factor blocks must tile the absmaxes: 256 each (QLoRA), or fewer for a small layer."""
    return next(size for size in range(min(n, limit), 0, -1) if n % size == 0)
