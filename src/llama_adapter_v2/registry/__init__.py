"""MLflow model registry: register each trained adapter as a pyfunc, promote it behind a gate.

The served pyfunc (``pyfunc_model`` -> ``answering``) answers through ``infer.chat``.
"""

from llama_adapter_v2.registry.promote import PromotionDecision, promote
from llama_adapter_v2.registry.register import RegisteredVersion, register, with_baseline

__all__ = ["PromotionDecision", "RegisteredVersion", "promote", "register", "with_baseline"]
