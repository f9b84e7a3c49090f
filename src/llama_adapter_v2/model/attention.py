"""Llama self-attention with gated prompt tokens (docs/METHOD.md §2).

The text path is transformers' own: rotary embedding, KV cache, and the attention function
the config names (eager or sdpa). The prompt path is a second, unmasked softmax over prompt
keys and values that carry no rotary embedding; its output is gated per head (or by one
scalar) through ``tanh`` and added before ``o_proj``. With the gate at zero the layer computes
exactly what the frozen layer computes.

Prompt keys and values come in through the ``adapter_prompts`` keyword that transformers
hands from the model's forward down to every attention module. They are computed once per
forward (or once per ``generate`` call) by :class:`~llama_adapter_v2.model.adapter.LlamaAdapterV2`
and never stored on the module, so no stale prompt state can survive an optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.quantize import factory_of
from llama_adapter_v2.model.trainable import AdapterModule, Group, Trainable

PromptSource = Literal["visual", "adaptation"]
GateKind = Literal["head", "scalar"]


@dataclass(frozen=True)
class PromptKV:
    """Keys and values of one layer's prompt tokens, shaped (B or 1, kv_heads, prompt_len, head_dim).

    ``per_head`` memoises, for work without autograd (a ``generate`` call), the keys expanded
    per query head and the values already scaled by ``tanh(gate)``: they are constant over the
    call, so the decode steps after the first do only ``q Kp^T``, the softmax and ``P Vp``. It
    lives exactly as long as this object, i.e. one forward or one ``generate`` call.
    """

    keys: torch.Tensor
    values: torch.Tensor
    per_head: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )


PromptKVByLayer = Mapping[int, PromptKV]
PROMPT = Trainable("language", "prompt", decays=True)


class PromptedLlamaAttention(AdapterModule):
    """Replaces one ``LlamaAttention``: same projections (shared, not copied) plus a gate.

    ``source`` says where this layer's prompt tokens come from: the visual path (early fusion)
    or its own learnable adaptation prompt (``prompt`` parameter, visual tokens added to it
    under additive fusion); ``adapter_params`` puts the gate in that source's group.
    """

    def __init__(
        self,
        attention: LlamaAttention,
        *,
        source: PromptSource,
        prompt_len: int,
        gate: GateKind,
        gate_init: Literal["zero", "random"] = "zero",
    ) -> None:
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.num_heads = self.config.num_attention_heads
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.source: PromptSource = source
        factory = _factory_of(attention)
        self.gate = nn.Parameter(torch.zeros(self.num_heads if gate == "head" else 1, **factory))
        if gate_init == "random":
            nn.init.normal_(self.gate, std=0.5)
        self.prompt = (
            nn.Parameter(torch.empty(prompt_len, self.config.hidden_size, **factory))
            if source == "adaptation"
            else None
        )
        if self.prompt is not None:
            nn.init.normal_(self.prompt)

    def adapter_params(self) -> dict[str, Trainable]:
        """The gate trains with the data that feeds this layer's prompts: a visual layer's gate with
        the captions (visual group), an adaptation layer's with the instructions (language group)."""
        group: Group = "visual" if self.source == "visual" else "language"
        declared = {"gate": Trainable(group, "gate", decays=False)}
        return declared | ({"prompt": PROMPT} if self.prompt is not None else {})

    def prompt_kv(self, prompt_tokens: torch.Tensor, row_mask: torch.Tensor | None = None) -> PromptKV:
        """Project prompt tokens (B or 1, L, hidden) to keys and values: no rotary, no mask.

        ``row_mask`` (B, 1, 1) zeroes the values of rows that have no prompts (a text-only
        sample in a mixed batch): their prompt attention then adds exactly nothing.
        """
        shape = (*prompt_tokens.shape[:-1], -1, self.head_dim)
        keys = self.k_proj(prompt_tokens).view(shape).transpose(1, 2)
        values = self.v_proj(prompt_tokens).view(shape).transpose(1, 2)
        if row_mask is not None:
            values = values * row_mask.view(-1, 1, 1, 1)
        return PromptKV(keys=keys, values=values)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        adapter_prompts: PromptKVByLayer | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)

        attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
            ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        )
        output, weights = attend(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        prompt = adapter_prompts.get(self.layer_idx) if adapter_prompts is not None else None
        if prompt is not None:
            output = output + self._gated_prompt_attention(queries, prompt)
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights

    def _gated_prompt_attention(self, queries: torch.Tensor, prompt: PromptKV) -> torch.Tensor:
        """tanh(g_h) * softmax(q Kp^T / sqrt(d)) Vp, as (B, T, heads, head_dim).

        The gate multiplies the few prompt values rather than the long output: the same product,
        fewer multiplications, and still an exact zero at initialisation.
        """
        keys, values = self._prompt_per_head(prompt, queries.shape[0], queries.dtype)
        scores = torch.matmul(queries, keys.transpose(2, 3)) * self.scaling
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
        return torch.matmul(probs, values).transpose(1, 2)

    def _prompt_per_head(
        self, prompt: PromptKV, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys per head and gate-scaled values per head, (batch, heads, L, head_dim) each.

        Without autograd they are memoised on ``prompt`` (one ``generate`` call: computed at the
        first step, reused by every later one). With autograd they are computed in every forward,
        as before: a memo would hand a recomputing forward (activation checkpointing) tensors of
        another graph. The key holds the gate's version, so an in-place change of the gate
        (a loaded adapter, an optimizer step) is never served a stale product.
        """
        memoise = not torch.is_grad_enabled()
        key = (id(self), batch, dtype, self.gate._version)
        if memoise and key in prompt.per_head:
            return prompt.per_head[key]
        keys = _per_head(prompt.keys, self.num_key_value_groups, batch)
        gate = torch.tanh(self.gate).to(dtype).view(1, -1, 1, 1)
        values = _per_head(prompt.values, self.num_key_value_groups, batch) * gate
        if memoise:
            prompt.per_head[key] = (keys, values)
        return keys, values

    def extra_repr(self) -> str:
        prompt_len = 0 if self.prompt is None else self.prompt.shape[0]
        gates = self.gate.numel()
        return f"layer={self.layer_idx}, source={self.source}, prompt_len={prompt_len}, gates={gates}"


def _factory_of(attention: LlamaAttention) -> dict[str, Any]:
    """Device and compute dtype of the frozen projections, so new parameters sit beside them
    (a quantised base stores integer codes: its compute dtype is not a stored weight's)."""
    projection = attention.o_proj
    return factory_of(projection.frozen if isinstance(projection, AdaptedLinear) else projection)


def _per_head(states: torch.Tensor, groups: int, batch: int) -> torch.Tensor:
    """(b, kv_heads, L, d) -> (batch, heads, L, d): repeat per query group, broadcast a shared batch.

    ``batch`` may be a multiple of ``b`` (beam search or several samples per prompt repeat each
    input in place), so whole blocks are repeated sample by sample.
    """
    if states.shape[0] not in (1, batch):
        if batch % states.shape[0]:
            raise ValueError(f"prompt batch {states.shape[0]} does not divide the text batch {batch}")
        states = states.repeat_interleave(batch // states.shape[0], dim=0)
    states = states.expand(batch, *states.shape[1:])
    if groups == 1:
        return states
    b, kv_heads, length, dim = states.shape
    return (
        states[:, :, None].expand(b, kv_heads, groups, length, dim).reshape(b, kv_heads * groups, length, dim)
    )
