"""Tiny adapted models for the evaluation, generation, chat and expert tests (random frozen base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.tokenizer import train_tokenizer

TEXTS = [
    "Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "### Instruction: Generate caption of this image ### Input: ### Response: a red circle on a blue square",
    "Human: What is drawn in this picture?### Assistant: A green triangle at the top.###",
    "What colour is the sky? The sky is blue. What is 3 plus 4? 7. Reverse the words.",
]


def tiny_config(base_path: Path | None = None, **adapter: Any) -> Config:
    """A 2-layer Llama (width 64) with a 2-layer CLIP tower: layer 0 visual, layer 1 prompts."""
    return Config.model_validate(
        {
            "name": "tiny",
            "model": {
                "base": {
                    "path": base_path,
                    "arch": {
                        "vocab_size": 320,
                        "hidden_size": 64,
                        "intermediate_size": 128,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 2,
                        "max_position_embeddings": 256,
                    },
                },
                "vision": {
                    "arch": {
                        "image_size": 32,
                        "patch_size": 8,
                        "hidden_size": 32,
                        "intermediate_size": 64,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 4,
                        "projection_dim": 32,
                    }
                },
                "adapter": {
                    "prompt_len": 3,
                    "prompt_layers": 1,
                    "visual_layers": 1,
                    "visual": {"n_query": 3, "width": 32, "n_blocks": 1, "n_heads": 4},
                    **adapter,
                },
            },
            "training": {"device": "cpu", "output_dir": "unused"},
        }
    )


def write_tiny_base(folder: Path) -> Path:
    """A random tiny Llama and a BPE tokenizer trained on ``TEXTS``, saved as one local folder."""
    tokenizer = train_tokenizer(TEXTS, 320, folder)
    arch = tiny_config().model.base.arch
    assert arch is not None
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            **arch.model_dump(),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(folder)
    return folder


def random_gates(model: Any, seed: int = 0) -> None:
    """Move every gate away from zero so prompts and images change the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.adapter_named_parameters():
        if "gate" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator)
