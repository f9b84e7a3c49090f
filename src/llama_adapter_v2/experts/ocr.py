"""OCR expert: the text Tesseract reads in the image (Debian ``tesseract-ocr`` + pytesseract)."""

from __future__ import annotations

import shutil

from PIL import Image

from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.experts.base import ExpertUnavailableError, register_expert


class OcrExpert:
    """Runs the ``tesseract`` binary; checks binary and language data once, at construction."""

    name = "ocr"
    label = "Text in the image"

    def __init__(self, language: str = "eng") -> None:
        import pytesseract

        command = pytesseract.pytesseract.tesseract_cmd
        if shutil.which(command) is None:
            raise ExpertUnavailableError(
                f"OCR expert: the {command!r} binary is not on PATH "
                "(Debian/Ubuntu: apt-get install tesseract-ocr tesseract-ocr-eng)"
            )
        available = pytesseract.get_languages(config="")
        if language not in available:
            raise ExpertUnavailableError(
                f"OCR expert: Tesseract has no {language!r} language data (installed: {available}); "
                f"install tesseract-ocr-{language}"
            )
        self.language = language

    def describe(self, image: Image.Image) -> str:
        """Recognised text with runs of whitespace collapsed to single spaces."""
        import pytesseract

        text = pytesseract.image_to_string(image.convert("RGB"), lang=self.language)
        return " ".join(text.split())


@register_expert("ocr")
def build_ocr_expert(cfg: ExpertConfig) -> OcrExpert:
    return OcrExpert(language=cfg.language)
