"""LLaMA-Adapter V2 on a frozen transformers Llama and CLIP tower (docs/METHOD.md).

One file per piece: ``trainable`` (what trains: each adapter module's declaration),
``adapter_linear`` (bias, scale, LoRA), ``attention`` (gated prompts), ``vision`` (CLIP tokens
to visual prompts), ``adapter`` (the model), ``build`` (from a Config), ``checkpoint``
(adapter-only files), ``fold`` (merge for inference), ``params`` (counts).
"""

from llama_adapter_v2.model.adapter import AdapterConfigError, AdapterOutput, LlamaAdapterV2
from llama_adapter_v2.model.build import BaseModelError, build_model, load_tokenizer
from llama_adapter_v2.model.checkpoint import AdapterMismatchError, load_adapter, save_adapter
from llama_adapter_v2.model.fold import export_folded, fold_adapter
from llama_adapter_v2.model.params import count_parameters

__all__ = [
    "AdapterConfigError",
    "AdapterMismatchError",
    "AdapterOutput",
    "BaseModelError",
    "LlamaAdapterV2",
    "build_model",
    "count_parameters",
    "export_folded",
    "fold_adapter",
    "load_adapter",
    "load_tokenizer",
    "save_adapter",
]
