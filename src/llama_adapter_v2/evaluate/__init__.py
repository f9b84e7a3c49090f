"""Evaluation: caption and instruction metrics, generation, chat, and the evaluation run.

``evaluate`` is resolved lazily so that importing a metric module does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from llama_adapter_v2.evaluate.run import evaluate

        return evaluate
    raise AttributeError(name)
