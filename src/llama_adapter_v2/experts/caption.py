"""Caption expert: a caption-tuned adapted model (the project's own by default) describes the image.

The model is an adapter folder or a registered ``models:/name@alias``; it is loaded once, when
the expert is built, and captions with the fixed caption instruction, greedily.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.experts.base import ExpertUnavailableError, register_expert
from llama_adapter_v2.infer.generation import GenerationSettings, caption_prompt, generate_texts
from llama_adapter_v2.infer.loading import load_for_inference

DEFAULT_CAPTION_MODEL = "artifacts/train/demo/adapter"


class CaptionExpert:
    """Greedy caption of the image by an adapted model loaded with ``load_for_inference``."""

    name = "caption"
    label = "Caption"

    def __init__(self, source: str | Path, max_new_tokens: int = 32) -> None:
        try:
            self.loaded = load_for_inference(source)
        except FileNotFoundError as error:
            raise ExpertUnavailableError(f"caption expert: {error}") from error
        if self.loaded.model.image_transform is None:
            raise ExpertUnavailableError(f"caption expert: {source} has no visual path, it cannot see images")
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def describe(self, image: Image.Image) -> str:
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        [caption] = generate_texts(model, tokenizer, [caption_prompt(image)], self.settings)
        return caption


@register_expert("caption")
def build_caption_expert(cfg: ExpertConfig) -> CaptionExpert:
    return CaptionExpert(cfg.model or DEFAULT_CAPTION_MODEL)
