"""LLaMA-Adapter V2 around a frozen transformers ``LlamaForCausalLM`` and CLIP tower (docs/METHOD.md §1-§4).

Wrapping happens in place: the seven linears of every decoder layer become ``AdaptedLinear``
(bias, scale, optional LoRA), the attention of the adapted layers becomes
``PromptedLlamaAttention``, the RMSNorm weights are unfrozen, and a ``VisualBridge`` turns
CLIP tokens into visual prompts. Nothing of the frozen weights is copied.

Per forward (or per ``generate`` call) the prompt keys and values of every adapted layer are
computed once from the current parameters and handed to the attention modules as the
``adapter_prompts`` keyword; they are never stored between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm

from llama_adapter_v2.config.layer_plan import AdapterConfigError, LayerPlan
from llama_adapter_v2.config.schema import AdapterConfig, ModelConfig
from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.attention import PromptedLlamaAttention, PromptKV, PromptSource
from llama_adapter_v2.model.sharding import full_tensor, shard_like
from llama_adapter_v2.model.trainable import (
    GROUPS,
    AdapterModule,
    AdapterParameter,
    Group,
    Trainable,
    check_group_names,
)
from llama_adapter_v2.model.vision import ClipImageTransform, ClipTower, FrozenClipEncoder, VisualBridge

IGNORE_INDEX = -100
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
UNFROZEN_NORM = Trainable("language", "norm", decays=False)


@dataclass
class AdapterOutput:
    """``loss``: mean cross-entropy over positions whose label is not -100 (labels shifted inside).

    ``logits``: without labels, (B, T, vocab) for every position. With labels, only the
    supervised positions are projected to the vocabulary (the rest would be thrown away):
    ``logits`` is (N, vocab) and ``targets`` (N,) holds the label each row predicts.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor | None = None


class LlamaAdapterV2(nn.Module):
    """The whole method on one frozen Llama (and, when the config uses images, one CLIP tower)."""

    def __init__(
        self,
        base: LlamaForCausalLM,
        adapter: AdapterConfig,
        plan: LayerPlan,
        *,
        clip: ClipTower | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, LlamaForCausalLM):
            raise TypeError(
                f"LLaMA-Adapter V2 wraps a transformers LlamaForCausalLM; got {type(base).__name__} "
                f"(model_type {getattr(getattr(base, 'config', None), 'model_type', '?')!r})"
            )
        self.adapter_config = adapter
        self.model_config = model_config
        self.plan = plan
        self.base = base.requires_grad_(False)
        self._wrap_linears()
        self._wrap_attention()
        self.clip: FrozenClipEncoder | None = None
        self.visual_bridge: VisualBridge | None = None
        self.image_transform: ClipImageTransform | None = None
        if self.plan.uses_images:
            self._attach_visual_path(clip)
        self.set_trainable(GROUPS)

    # ------------------------------------------------------------------ construction

    def _wrap_linears(self) -> None:
        """Bias and scale go on ``bias_targets`` (one list for both, as in the paper and C65);
        LoRA on ``lora_targets``; a linear in neither stays the plain frozen layer."""
        adapter = self.adapter_config
        lora_targets = set(adapter.lora_targets) if adapter.lora_rank else set()
        for owner, name in decoder_linears(self.base):
            biased, lora = name in adapter.bias_targets, name in lora_targets
            if not (biased or lora):
                continue
            wrapped = AdaptedLinear(
                getattr(owner, name),
                bias=biased,
                scale_position=adapter.scale_position,
                lora_rank=adapter.lora_rank if lora else 0,
                lora_alpha=adapter.lora_alpha,
            )
            setattr(owner, name, wrapped)

    def _wrap_attention(self) -> None:
        adapter = self.adapter_config
        sources: dict[int, PromptSource] = dict.fromkeys(self.plan.visual_layers, "visual")
        sources.update(dict.fromkeys(self.plan.prompt_layers, "adaptation"))
        for index, source in sources.items():
            layer = self.base.model.layers[index]
            attention = layer.self_attn
            assert isinstance(attention, LlamaAttention)
            layer.self_attn = PromptedLlamaAttention(
                attention,
                source=source,
                prompt_len=adapter.prompt_len,
                gate=adapter.gate,
                gate_init=adapter.gate_init,
            )

    def _attach_visual_path(self, clip: ClipTower | None) -> None:
        if clip is None:
            fusion = "additive" if self.plan.additive else "early"
            raise AdapterConfigError(
                [("model.vision", f"this adapter config feeds visual prompts ({fusion} fusion) "
                  "but no CLIP tower was given")]
            )
        self.clip = FrozenClipEncoder(clip)
        reference = self.base.lm_head.weight
        with torch.device(reference.device):
            bridge = VisualBridge(self.clip.width, self.base.config.hidden_size, self.adapter_config.visual)
        self.visual_bridge = bridge.to(dtype=reference.dtype)
        self.image_transform = ClipImageTransform(self.clip.image_size)

    def enable_activation_checkpointing(self) -> None:
        """Recompute every decoder layer in the backward rather than keep its activations.

        Non-reentrant ``torch.utils.checkpoint`` through transformers' per-layer switch: the
        prompt keys and values reach the layer as a keyword and are tensors of this forward's
        graph, which the non-reentrant form handles (the reentrant one would cut their gradient),
        and the prompts' memo (``PromptKV.per_head``) is off wherever autograd records, so the
        recomputing forward rebuilds the per-head prompts from the same tensors instead of
        reusing another graph's. Applies in training mode with gradients only; ``generate`` and
        evaluation run the layers as they are.
        """
        self.base.activation_checkpointing_enable({"use_reentrant": False})

    # ------------------------------------------------------------------ parameters

    def prompted_attentions(self) -> Iterator[PromptedLlamaAttention]:
        for layer in self.base.model.layers:
            if isinstance(layer.self_attn, PromptedLlamaAttention):
                yield layer.self_attn

    def adapter_parameters(self) -> list[AdapterParameter]:
        """Every parameter the method adds or unfreezes, as its module declares it, in module order.

        The frozen base and tower are never in it: only declared parameters are.
        """
        return [
            AdapterParameter(f"{prefix}.{name}", module.get_parameter(name), trainable)
            for prefix, module in self.named_modules()
            for name, trainable in declared_trainables(module).items()
        ]

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(declared.name, declared.parameter) for declared in self.adapter_parameters()]

    def parameter_groups(self) -> dict[Group, list[tuple[str, nn.Parameter]]]:
        """``{"visual": [...], "language": [...]}``: every adapter parameter in exactly one group."""
        groups: dict[Group, list[tuple[str, nn.Parameter]]] = {group: [] for group in GROUPS}
        for declared in self.adapter_parameters():
            groups[declared.trainable.group].append((declared.name, declared.parameter))
        return groups

    def set_trainable(self, groups: Iterable[Group]) -> None:
        """Let gradients reach only these groups (a caption batch: ``["visual"]``).

        Autograd then computes no gradient for the other group at all, so an optimizer step
        cannot change it, bit for bit, whatever its weight decay or momentum.
        """
        chosen = set(check_group_names(groups))
        for declared in self.adapter_parameters():
            declared.parameter.requires_grad_(declared.trainable.group in chosen)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors, also when FSDP2 shards them (then a collective: every rank calls it)."""
        return {name: full_tensor(parameter.detach()) for name, parameter in self.adapter_named_parameters()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: the key sets must match and every shape must agree (errors list them)."""
        own = dict(self.adapter_named_parameters())
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise KeyError(
                f"adapter state does not fit this model: {len(missing)} missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}"
            )
        wrong = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}"
            for k, p in own.items()
            if state[k].shape != p.shape
        ]
        if wrong:
            raise ValueError("adapter tensor shapes differ from this model's: " + "; ".join(wrong[:5]))
        for name, parameter in own.items():
            parameter.copy_(shard_like(parameter, state[name]))

    def gate_values(self) -> dict[str, float]:
        """Mean |tanh(gate)| per adapted layer (how much each layer listens to its prompts)."""
        return {
            f"layer_{attention.layer_idx:02d}_{attention.source}": float(
                torch.tanh(full_tensor(attention.gate.detach())).abs().mean()
            )
            for attention in self.prompted_attentions()
        }

    # ------------------------------------------------------------------ computation

    def prompt_states(
        self, images: torch.Tensor | None, batch: int, image_mask: torch.Tensor | None = None
    ) -> dict[int, PromptKV]:
        """Prompt keys and values of every adapted layer for this call (text-only: no visual ones).

        ``image_mask`` (B,) marks the rows of a mixed batch that really have an image; the
        others get no visual prompts at all (docs/METHOD.md §3: MM feeds them a zero image instead).
        """
        visual = self.visual_prompts(images, batch)
        row_mask = None
        if visual is not None and image_mask is not None:
            row_mask = image_mask.to(device=visual.device, dtype=visual.dtype).view(-1, 1, 1)
        states: dict[int, PromptKV] = {}
        for attention in self.prompted_attentions():
            if attention.source == "visual":
                if visual is not None:
                    states[attention.layer_idx] = attention.prompt_kv(visual, row_mask)
                continue
            assert attention.prompt is not None
            tokens = attention.prompt.unsqueeze(0)
            if visual is not None and self.plan.additive:
                tokens = tokens + (visual if row_mask is None else visual * row_mask)
            states[attention.layer_idx] = attention.prompt_kv(tokens)
        return states

    def visual_prompts(self, images: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if images is None:
            return None
        if self.clip is None or self.visual_bridge is None:
            raise ValueError(
                "images were given but this adapter has no visual path "
                "(model.adapter: no visual layers and no additive prompt layers); pass images=None"
            )
        if images.dim() == 4 and images.shape[0] != batch:
            raise ValueError(f"{images.shape[0]} images for a batch of {batch} token sequences")
        return self.visual_bridge(self.clip(images))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> AdapterOutput:
        prompts = self.prompt_states(images, input_ids.shape[0], image_mask)
        hidden = self.base.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, adapter_prompts=prompts
        ).last_hidden_state
        if labels is None:
            return AdapterOutput(loss=None, logits=self.base.lm_head(hidden))
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.base.lm_head(hidden[:, :-1][supervised])
        targets = targets[supervised]
        loss = functional.cross_entropy(logits.float(), targets, reduction="sum") / supervised.sum().clamp(
            min=1
        )
        return AdapterOutput(loss=loss, logits=logits, targets=targets)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """transformers ``generate`` with the prompt keys and values computed once for the call.

        A forward pre-hook, present only during this call, hands them to every step's forward.
        """
        prompts = self.prompt_states(images, input_ids.shape[0], image_mask)
        hook = self.base.register_forward_pre_hook(_with_prompts(prompts), with_kwargs=True)
        try:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
        finally:
            hook.remove()


def decoder_linears(base: LlamaForCausalLM) -> Iterator[tuple[nn.Module, str]]:
    """(owner, attribute) of the seven linears of every decoder layer: what bias, scale and LoRA wrap."""
    for layer in base.model.layers:
        for owner, names in ((layer.self_attn, ATTENTION_LINEARS), (layer.mlp, MLP_LINEARS)):
            for name in names:
                yield owner, name


def declared_trainables(module: nn.Module) -> dict[str, Trainable]:
    """What ``module`` trains: its own declaration, or, for the base's RMSNorms, which the method
    unfreezes (a transformers class that cannot declare itself), the norm weight."""
    if isinstance(module, AdapterModule):
        return module.adapter_params()
    if isinstance(module, LlamaRMSNorm):
        return {"weight": UNFROZEN_NORM}
    return {}


def _with_prompts(
    prompts: dict[int, PromptKV],
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    def inject(
        _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, "adapter_prompts": prompts}

    return inject

