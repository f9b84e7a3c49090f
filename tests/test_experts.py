"""Experts: OCR on rendered text with the real engines (RapidOCR by default, Tesseract optional),
the registry, and missing engines.

RapidOCR's models ship in its wheel, so its tests run everywhere. The Tesseract tests need the
system binary: they skip with the reason, or fail under LAV2_REQUIRE_ALL_TESTS=1 (CI).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pytest
from PIL import Image, ImageDraw, ImageFont
from tiny_adapted import random_gates, tiny_config, write_tiny_base

from llama_adapter_v2.config.loader import ConfigError, validate_config
from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.experts import (
    ExpertUnavailableError,
    build_expert,
    build_experts,
    registered_experts,
)
from llama_adapter_v2.infer.expert_text import expert_context
from llama_adapter_v2.infer.generation import GenerationSettings, caption_prompt, generate_texts
from llama_adapter_v2.model.build import build_model, load_tokenizer
from llama_adapter_v2.model.checkpoint import save_adapter

DEJAVU_SANS = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
TESSERACT = ExpertConfig(kind="ocr", engine="tesseract")


def rendered_text(text: str) -> Image.Image:
    """Black DejaVu Sans (shipped with matplotlib, so no system font is needed) at 48 px on white."""
    font = ImageFont.truetype(str(DEJAVU_SANS), 48)
    image = Image.new("RGB", (720, 120), "white")
    ImageDraw.Draw(image).text((24, 30), text, font=font, fill="black")
    return image


@pytest.fixture(scope="module")
def rapidocr() -> object:
    expert = build_expert(ExpertConfig(kind="ocr"))
    assert expert is not None and type(expert).__name__ == "RapidOcrExpert"
    return expert


def test_default_ocr_engine_reads_rendered_text_offline(rapidocr) -> None:
    # the network guard of conftest refuses outside connections: the models come from the wheel
    assert rapidocr.describe(rendered_text("OPEN 24 HOURS")) == "OPEN 24 HOURS"
    assert rapidocr.describe(Image.new("RGB", (200, 80), "white")) == ""


def test_expert_text_fills_the_input_slot(rapidocr) -> None:
    image = rendered_text("EXIT 12")
    assert expert_context([rapidocr], image) == "Text in the image: EXIT 12"
    assert expert_context([rapidocr], image, "Read the sign.") == "Read the sign.\nText in the image: EXIT 12"
    assert expert_context([rapidocr], None, "no image") == "no image"


def test_ocr_engine_and_language_are_checked_with_the_config(tmp_path: Path) -> None:
    assert ExpertConfig(kind="ocr").ocr_engine == "rapidocr"
    assert ExpertConfig(kind="ocr", engine="tesseract", language="deu").language == "deu"
    arch = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2}
    base = {"name": "x", "model": {"base": {"arch": arch}, "vision": {"arch": {}},
                                   "experts": [{"kind": "ocr", "language": "deu"}]}}
    refused = r"model\.experts\.0\.language: .*rapidocr engine reads.*engine: tesseract"
    with pytest.raises(ConfigError, match=refused):
        validate_config(base, tmp_path / "c.yaml", tmp_path)
    base["model"]["experts"] = [{"kind": "caption", "engine": "tesseract"}]
    with pytest.raises(ConfigError, match=r"model\.experts\.0\.engine: .*ocr experts only"):
        validate_config(base, tmp_path / "c.yaml", tmp_path)


def test_tesseract_engine_reads_rendered_text(require: Callable[[bool, str], None]) -> None:
    require(shutil.which("tesseract") is not None,
            "the optional Tesseract OCR engine needs the tesseract binary (apt-get install tesseract-ocr)")
    expert = build_expert(TESSERACT)
    assert expert is not None and type(expert).__name__ == "TesseractOcrExpert"
    assert expert.describe(rendered_text("OPEN 24 HOURS")) == "OPEN 24 HOURS"
    assert expert.describe(Image.new("RGB", (200, 80), "white")) == ""
    with pytest.raises(ExpertUnavailableError, match="tesseract-ocr-xyz"):
        build_expert(ExpertConfig(kind="ocr", engine="tesseract", language="xyz"))


def test_missing_tesseract_is_a_clear_error_or_a_warning_when_optional(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ExpertUnavailableError, match=r"'tesseract' binary is not on PATH.*apt-get install"):
        build_expert(TESSERACT)
    with caplog.at_level(logging.WARNING):
        assert build_experts([ExpertConfig(kind="ocr", engine="tesseract", optional=True)]) == []
    assert "optional expert 'ocr' skipped" in caplog.text
    assert build_expert(ExpertConfig(kind="ocr")) is not None  # the default engine needs no binary


def test_require_skips_or_fails_by_the_ci_variable(require: Callable[[bool, str], None],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "never shown")
    monkeypatch.delenv("LAV2_REQUIRE_ALL_TESTS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs a thing"):
        require(False, "needs a thing")
    monkeypatch.setenv("LAV2_REQUIRE_ALL_TESTS", "1")
    with pytest.raises(pytest.fail.Exception, match=r"needs a thing \(LAV2_REQUIRE_ALL_TESTS=1"):
        require(False, "needs a thing")


def test_registry_lists_builtin_experts() -> None:
    assert {"ocr", "caption"} <= set(registered_experts())


def test_caption_expert_captions_like_the_model_it_loads(tmp_path: Path, rapidocr) -> None:
    cfg = tiny_config(write_tiny_base(tmp_path / "base"))
    model = build_model(cfg).eval()
    random_gates(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    expert = build_expert(ExpertConfig(kind="caption", model=str(tmp_path / "adapter")))
    assert expert is not None
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    settings = GenerationSettings(max_new_tokens=32)
    tokenizer = load_tokenizer(cfg)
    expected = generate_texts(model, tokenizer, [caption_prompt(red), caption_prompt(blue)], settings)
    assert [expert.describe(red), expert.describe(blue)] == expected
    assert expected[0] != expected[1]
    caption_line = f"Caption: {expected[0]}" if expected[0] else ""
    assert expert_context([expert, rapidocr], red) == caption_line  # a plain red square has no text to read


def test_missing_caption_model_is_a_clear_error_or_skipped_when_optional(tmp_path: Path) -> None:
    with pytest.raises(ExpertUnavailableError, match="not an adapter folder"):
        build_expert(ExpertConfig(kind="caption", model=str(tmp_path / "nowhere")))
    assert build_experts([ExpertConfig(kind="caption", model=str(tmp_path / "nowhere"), optional=True)]) == []
