"""The config schema and its loader (pydantic and YAML only: no torch here)."""

from llama_adapter_v2.config.loader import (
    ConfigError,
    load_config,
    resolved_clip_arch,
    resolved_llama_arch,
    validate_config,
)
from llama_adapter_v2.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "resolved_clip_arch",
    "resolved_llama_arch",
    "validate_config",
]
