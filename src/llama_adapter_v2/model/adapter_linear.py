"""Bias, scale and optional LoRA around one frozen ``nn.Linear`` (docs/METHOD.md §1 and §7).

The frozen layer is held by reference, never copied. At initialisation (bias 0, scale 1,
LoRA ``B`` 0) the output is bit-for-bit the frozen layer's output: adding zero and
multiplying by one are exact in floating point, and the bias rides in the same GEMM call.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

from llama_adapter_v2.model.quantize import QuantizedLinear, factory_of
from llama_adapter_v2.model.trainable import AdapterModule, Trainable

ScalePosition = Literal["output", "input", "none"]
BIAS = Trainable("language", "bias", decays=False)
SCALE = Trainable("language", "scale", decays=False)
LORA = Trainable("language", "lora", decays=True)


class AdaptedLinear(AdapterModule):
    """``y = s * ((W + c B A) x + b)`` (output form) or ``y = (W + c B A)(s * x) + b`` (input form).

    ``b`` is the adapter bias added to the frozen bias (if the base has one); ``c`` is the LoRA
    scaling ``alpha / rank``. Every piece is optional so that MM (bias only on some layers),
    C65 (input scale) and the paper (output scale) are all one class. ``W`` may be stored
    quantised (``QuantizedLinear``); every adapter tensor is in the compute dtype either way.
    """

    def __init__(
        self,
        frozen: nn.Linear | QuantizedLinear,
        *,
        bias: bool,
        scale_position: ScalePosition,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        self.frozen = frozen
        out_features, in_features = frozen.out_features, frozen.in_features
        factory = factory_of(frozen)
        self.scale_position: ScalePosition = scale_position if bias else "none"
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        scale_width = in_features if self.scale_position == "input" else out_features
        self.scale = (
            nn.Parameter(torch.ones(scale_width, **factory)) if self.scale_position != "none" else None
        )
        self.lora_scaling = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features, **factory))
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank, **factory))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            self.lora_a = self.lora_b = None

    def adapter_params(self) -> dict[str, Trainable]:
        """Bias, scale and LoRA train with the instruction data (the language group)."""
        declared = {"bias": BIAS} if self.bias is not None else {}
        if self.scale is not None:
            declared["scale"] = SCALE
        if self.lora_a is not None:
            declared |= {"lora_a": LORA, "lora_b": LORA}
        return declared

    @property
    def in_features(self) -> int:
        return self.frozen.in_features

    @property
    def out_features(self) -> int:
        return self.frozen.out_features

    def _total_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return self.frozen.bias
        if self.frozen.bias is None:
            return self.bias
        return self.frozen.bias + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None and self.scale_position == "input":
            x = x * self.scale
        bias = self._total_bias()
        if self.scale is not None and self.scale_position == "output":
            # s * (W x + b) as one GEMM and one fused multiply-add pass over the output.
            y = self._frozen_linear(x, None)
            if self.lora_a is not None:
                y = y + self._lora(x)
            return torch.addcmul(self.scale * bias, y, self.scale) if bias is not None else y * self.scale
        y = self._frozen_linear(x, bias)
        if self.lora_a is not None:
            y = y + self._lora(x)
        return y

    def _frozen_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.frozen, QuantizedLinear):
            return self.frozen.linear(x, bias)
        return functional.linear(x, self.frozen.weight, bias)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        assert self.lora_a is not None and self.lora_b is not None
        return functional.linear(functional.linear(x, self.lora_a), self.lora_b) * self.lora_scaling

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (docs/METHOD.md §7), LoRA merged too.

        Only over a full-precision base (``model/fold.py`` refuses a quantised one).
        """
        assert not isinstance(self.frozen, QuantizedLinear)
        weight = self.frozen.weight.clone()
        if self.lora_a is not None and self.lora_b is not None:
            weight += (self.lora_b @ self.lora_a) * self.lora_scaling
        bias = self._total_bias()
        bias = (
            torch.zeros(self.out_features, device=weight.device, dtype=weight.dtype) if bias is None else bias
        )
        if self.scale is not None and self.scale_position == "output":
            weight *= self.scale[:, None]
            bias = bias * self.scale
        elif self.scale is not None:
            weight *= self.scale[None, :]
        linear = nn.Linear(
            self.in_features, self.out_features, bias=True, device=weight.device, dtype=weight.dtype
        )
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        lora = self.lora_a.shape[0] if self.lora_a is not None else 0
        return f"bias={self.bias is not None}, scale={self.scale_position}, lora_rank={lora}"
