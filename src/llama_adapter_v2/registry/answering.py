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
from llama_adapter_v2.data.formatting import CHAT_SEPARATOR, prompt_text
from llama_adapter_v2.data.records import Record, Turn
from llama_adapter_v2.registry.requests import (
    ImageLimits,
    RequestError,
    check_instruction,
    decode_image,
    parse_history,
)

DEFAULT_MAX_NEW_TOKENS = 32


def request_record(instruction: str, history: list[tuple[str, str]]) -> Record:
    """A record whose prompt is the request: Alpaca for one question, chat with earlier turns."""
    turns = tuple(Turn(role, text) for role, text in history)  # type: ignore[arg-type]
    turns += (Turn("user", instruction), Turn("assistant", ""))
    template = "chat" if history else "alpaca"
    return Record(id="request", source="serving", kind="instruction", template=template, turns=turns)


class AdapterChatModel(mlflow.pyfunc.PythonModel):
    """Answers questions about an image with the adapted frozen Llama."""

    def load_context(self, context: Any) -> None:
        import torch

        from llama_adapter_v2.model import build_model, load_adapter, load_tokenizer
        from llama_adapter_v2.registry.register import model_identity

        settings = context.model_config
        self.cfg = Config.model_validate(json.loads(settings["config"]))
        found = model_identity(self.cfg)
        for key in ("base_identity", "vision_identity"):
            if found[key] != settings[key]:
                raise MlflowException(
                    f"{key.split('_')[0]} model changed since registration: registered {settings[key]}, "
                    f"found {found[key]} at {found[key.replace('identity', 'path')] or '(built from arch)'}"
                )
        torch.manual_seed(self.cfg.training.seed)
        self.model = build_model(self.cfg, device="cpu", dtype=torch.float32)
        load_adapter(self.model, context.artifacts["adapter"])
        self.model.eval()
        self.tokenizer = load_tokenizer(self.cfg)
        self.limits = ImageLimits.from_validation(self.cfg.data.validation)

    def _answer(self, image: Any, instruction: str, history: list[tuple[str, str]], max_new: int) -> str:
        import torch

        record = request_record(instruction, history)
        prompt = self.tokenizer.encode(prompt_text(record), add_special_tokens=False)
        if self.tokenizer.bos_token_id is not None:
            prompt = [self.tokenizer.bos_token_id, *prompt]
        input_ids = torch.tensor([prompt], dtype=torch.long)
        images = self.model.image_transform(image).unsqueeze(0)
        with torch.no_grad():
            output = self.model.generate(
                input_ids, images=images, max_new_tokens=max_new, do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )
        text = self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        return text.split(CHAT_SEPARATOR, 1)[0].strip()

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
            except RequestError as err:
                raise MlflowException.invalid_parameter_value(f"row {index}: {err}") from None
            rows.append(self._answer(image, instruction, history, max_new))
        return pd.DataFrame({"answer": rows})
