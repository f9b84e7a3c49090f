"""LLaMA-Adapter V2 on a frozen transformers Llama and CLIP vision tower."""

from llama_adapter_v2 import environment as _environment

_environment.apply()

__version__ = "0.1.0"
