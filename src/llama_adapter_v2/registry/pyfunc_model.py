"""The registered model's code (MLflow models-from-code): executed, never unpickled, on load.

MLflow copies this file into each model version; loading runs it, and ``set_model`` hands over
the model object. Everything it does lives in ``llama_adapter_v2.registry.answering``.
"""

from mlflow.models import set_model

from llama_adapter_v2.registry.answering import AdapterChatModel

set_model(AdapterChatModel())
