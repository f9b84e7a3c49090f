"""The pyfunc behind every registered version: image + instruction (+ history) -> answer.

``load_context`` rebuilds the model from the logged config, refuses a base or CLIP tower whose
identity differs from the one recorded at registration, and loads the adapter artifact.
``predict`` validates each row first: a bad row raises ``MlflowException`` with
INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and the message.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from llama_adapter_v2.config import Config
from llama_adapter_v2.infer.chat import ContextTooLongError, answer
from llama_adapter_v2.infer.generation import GenerationSettings
from llama_adapter_v2.infer.loading import inference_model
from llama_adapter_v2.model.build import load_tokenizer
from llama_adapter_v2.registry.register import model_identity
from llama_adapter_v2.registry.requests import (
    ImageLimits,
    RequestError,
    check_instruction,
    decode_image,
    parse_history,
)

DEFAULT_MAX_NEW_TOKENS = 32


class AdapterChatModel(mlflow.pyfunc.PythonModel):
    """Answers questions about an image with the adapted frozen Llama."""

    def load_context(self, context: Any) -> None:
        settings = context.model_config
        self.cfg = Config.model_validate(json.loads(settings["config"]))
        found = model_identity(self.cfg)
        for key in ("base_identity", "vision_identity"):
            if found[key] != settings[key]:
                raise MlflowException(
                    f"{key.split('_')[0]} model changed since registration: registered {settings[key]}, "
                    f"found {found[key]} at {found[key.replace('identity', 'path')] or '(built from arch)'}"
                )
        self.model = inference_model(self.cfg, context.artifacts["adapter"])
        self.tokenizer = load_tokenizer(self.cfg)
        self.limits = ImageLimits.for_config(self.cfg)

    def _answer(self, image: Any, instruction: str, history: list[tuple[str, str]], max_new: int) -> str:
        try:
            return answer(self.model, self.tokenizer, image, instruction, history,  # type: ignore[arg-type]
                          settings=GenerationSettings(max_new_tokens=max_new))
        except ContextTooLongError as err:
            raise RequestError(f"instruction: {err}") from None

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        max_new = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        rows = []
        for index, row in enumerate(model_input.to_dict(orient="records")):
            try:
                image = decode_image(row.get("image"), self.limits)
                instruction = check_instruction(row.get("instruction"))
                history = parse_history(row.get("history"))
                rows.append(self._answer(image, instruction, history, max_new))
            except RequestError as err:
                raise MlflowException.invalid_parameter_value(f"row {index}: {err}") from None
        return pd.DataFrame({"answer": rows})
