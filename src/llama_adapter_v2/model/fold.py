"""Fold bias, scale and LoRA into the frozen weights for inference (docs/METHOD.md §7).

``s * (W x + b)`` becomes ``W' = diag(s) W, b' = s * b``; ``W (s * x) + b`` becomes
``W' = W diag(s), b' = b``; LoRA merges as ``W + (alpha / r) B A``. Every decoder linear then
carries a plain bias (zero where the adapter had none), which is the transformers Llama with
``attention_bias=True`` and ``mlp_bias=True``.

Prompts and gates do not fold. Without them the export is a folder that stock
``LlamaForCausalLM.from_pretrained`` loads with no project code. With them the export is an
adapter folder (prompts, gates, norms, visual path) whose base is the folded Llama in
``<out>/base``: the per-linear overhead is gone, the prompts remain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from llama_adapter_v2.model.adapter import LlamaAdapterV2, decoder_linears
from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.checkpoint import save_adapter
from llama_adapter_v2.model.quantize import is_quantized

FOLDED_BASE_DIR = "base"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _with_zero_bias(linear: nn.Linear) -> nn.Linear:
    """The same frozen weight (shared, not copied) plus a zero bias, so every linear has one."""
    biased = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    biased.weight = linear.weight
    biased.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]), requires_grad=False)
    return biased


class QuantizedBaseFoldError(ValueError):
    """Folding writes bias, scale and LoRA into the frozen weights: a quantised base cannot take them."""


def refuse_quantized(model: LlamaAdapterV2) -> None:
    if is_quantized(model.base):
        kind = model.model_config.base.quantize if model.model_config is not None else "int8 or nf4"
        raise QuantizedBaseFoldError(
            f"model.base.quantize is {kind}: folding into a quantised base would lose the adapter in the "
            "rounding; load the adapter onto the full-precision base (model.base.quantize: none, e.g. "
            "in the adapter folder's adapter.json) and fold that"
        )


@torch.no_grad()
def fold_adapter(model: LlamaAdapterV2) -> LlamaAdapterV2:
    """Fold in place; the model computes the same function with plain biased linears."""
    refuse_quantized(model)
    for owner, name in decoder_linears(model.base):
        linear = getattr(owner, name)
        if isinstance(linear, AdaptedLinear):
            setattr(owner, name, linear.folded())
        elif linear.bias is None:
            setattr(owner, name, _with_zero_bias(linear))
    model.base.config.attention_bias = True
    model.base.config.mlp_bias = True
    folded = {"bias_targets": [], "scale_position": "none", "lora_rank": 0}
    model.adapter_config = model.adapter_config.model_copy(update=folded)
    if model.model_config is not None:
        adapter = model.model_config.adapter.model_copy(update=folded)
        model.model_config = model.model_config.model_copy(update={"adapter": adapter})
    return model


def has_prompts(model: LlamaAdapterV2) -> bool:
    return any(True for _ in model.prompted_attentions()) or model.visual_bridge is not None


def export_folded(model: LlamaAdapterV2, out: Path | str, tokenizer_from: Path | None = None) -> Path:
    """Fold ``model`` (in place) and write it to ``out``; returns the folder stock transformers loads.

    Without prompts that folder is ``out`` itself. With prompts it is ``out/base``, and ``out``
    is an adapter folder whose recorded base is that folded Llama.
    """
    out = Path(out)
    fold_adapter(model)
    prompted = has_prompts(model)
    base_dir = out / FOLDED_BASE_DIR if prompted else out
    base_dir.mkdir(parents=True, exist_ok=True)
    # the unfrozen norms are base weights: they stay in the base; prompts, gates and the bridge do not
    adapter_only = {
        name.removeprefix("base.")
        for name, _, trainable in model.adapter_parameters()
        if trainable.kind != "norm"
    }
    state = {k: v for k, v in model.base.state_dict().items() if k not in adapter_only}
    model.base.save_pretrained(base_dir, state_dict=state)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, base_dir / name)
    if prompted:
        if model.model_config is not None:
            base_cfg = model.model_config.base.model_copy(
                update={"path": Path(FOLDED_BASE_DIR), "arch": None}
            )
            model.model_config = model.model_config.model_copy(update={"base": base_cfg})
        save_adapter(model, out)
    return base_dir
