"""OCR expert: the text in the image, read by RapidOCR (default) or Tesseract (``engine: tesseract``).

RapidOCR is the default because everything it needs installs with pip: the wheel carries its
PP-OCR detection, orientation and recognition models (ONNX), which onnxruntime runs on the CPU;
nothing is downloaded at run time. Tesseract stays an option for the languages its language
packs cover; it needs the ``tesseract`` binary (Debian ``tesseract-ocr`` + ``tesseract-ocr-LANG``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytesseract
import rapidocr
from PIL import Image
from rapidocr import RapidOCR

from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.experts.base import ExpertUnavailableError, register_expert

# Detection scales the longer side to at most this many pixels: RapidOCR's default scales the
# *shorter* side up to 736, which turns a 720x120 sign into a 4416x736 pass (7 s instead of 0.4 s).
DETECTION_MAX_SIDE = 960


def _one_line(texts: Any) -> str:
    return " ".join(" ".join(str(text) for text in texts or ()).split())


class RapidOcrExpert:
    """PP-OCR through RapidOCR and onnxruntime; the models are files inside the installed wheel."""

    name = "ocr"
    label = "Text in the image"

    def __init__(self) -> None:
        models = Path(rapidocr.__file__).with_name("models")
        if not any(models.glob("*.onnx")):
            # Without them RapidOCR would try to download models: refuse instead (offline by design).
            raise ExpertUnavailableError(f"OCR expert: RapidOCR's bundled models are missing from {models}")
        self.engine = RapidOCR(params={
            "Global.log_level": "error",
            "Det.limit_type": "max",
            "Det.limit_side_len": DETECTION_MAX_SIDE,
        })

    def describe(self, image: Image.Image) -> str:
        """Recognised text boxes in reading order, joined with single spaces."""
        result = self.engine(np.asarray(image.convert("RGB")))
        return _one_line(result.txts)


class TesseractOcrExpert:
    """Runs the ``tesseract`` binary; checks binary and language data once, at construction."""

    name = "ocr"
    label = "Text in the image"

    def __init__(self, language: str = "eng") -> None:
        command = pytesseract.pytesseract.tesseract_cmd
        if shutil.which(command) is None:
            raise ExpertUnavailableError(
                f"OCR expert (engine tesseract): the {command!r} binary is not on PATH "
                "(Debian/Ubuntu: apt-get install tesseract-ocr tesseract-ocr-eng; "
                "or use the default engine, rapidocr, which needs nothing installed)"
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
        return _one_line([pytesseract.image_to_string(image.convert("RGB"), lang=self.language)])


@register_expert("ocr")
def build_ocr_expert(cfg: ExpertConfig) -> RapidOcrExpert | TesseractOcrExpert:
    if cfg.ocr_engine == "tesseract":
        return TesseractOcrExpert(language=cfg.language)
    return RapidOcrExpert()
