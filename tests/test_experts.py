"""Experts: OCR on rendered text with the real Tesseract binary, registry and missing binaries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from llama_adapter_v2.config.schema import ExpertConfig
from llama_adapter_v2.experts import (
    ExpertUnavailableError,
    build_expert,
    build_experts,
    expert_context,
    registered_experts,
)


def rendered_text(text: str) -> Image.Image:
    """Black text in Pillow's built-in scalable font at 48 px on white (no system font needed)."""
    font = ImageFont.load_default(size=48)
    image = Image.new("RGB", (720, 120), "white")
    ImageDraw.Draw(image).text((24, 30), text, font=font, fill="black")
    return image


def test_ocr_expert_reads_rendered_text() -> None:
    expert = build_expert(ExpertConfig(kind="ocr"))
    assert expert is not None
    assert expert.describe(rendered_text("OPEN 24 HOURS")) == "OPEN 24 HOURS"
    assert expert.describe(Image.new("RGB", (200, 80), "white")) == ""


def test_expert_text_fills_the_input_slot() -> None:
    experts = build_experts([ExpertConfig(kind="ocr")])
    image = rendered_text("EXIT 12")
    assert expert_context(experts, image) == "Text in the image: EXIT 12"
    assert expert_context(experts, image, "Read the sign.") == "Read the sign.\nText in the image: EXIT 12"
    assert expert_context(experts, None, "no image") == "no image"


def test_missing_tesseract_is_a_clear_error_or_a_warning_when_optional(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ExpertUnavailableError, match=r"'tesseract' binary is not on PATH.*apt-get install"):
        build_expert(ExpertConfig(kind="ocr"))
    with caplog.at_level(logging.WARNING):
        assert build_experts([ExpertConfig(kind="ocr", optional=True)]) == []
    assert "optional expert 'ocr' skipped" in caplog.text


def test_missing_language_data_names_the_package() -> None:
    with pytest.raises(ExpertUnavailableError, match="tesseract-ocr-xyz"):
        build_expert(ExpertConfig(kind="ocr", language="xyz"))


def test_registry_lists_builtin_experts() -> None:
    assert {"ocr", "caption"} <= set(registered_experts())


def test_caption_expert_captions_like_the_model_it_loads(tmp_path: Path) -> None:
    from tiny_adapted import random_gates, tiny_config, write_tiny_base

    from llama_adapter_v2.evaluate.generation import GenerationSettings, caption_prompt, generate_texts
    from llama_adapter_v2.model.build import build_model, load_tokenizer
    from llama_adapter_v2.model.checkpoint import save_adapter

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
    ocr = build_expert(ExpertConfig(kind="ocr"))
    assert ocr is not None
    caption_line = f"Caption: {expected[0]}" if expected[0] else ""
    assert expert_context([expert, ocr], red) == caption_line  # a plain red square has no text to read


def test_missing_caption_model_is_a_clear_error_or_skipped_when_optional(tmp_path: Path) -> None:
    with pytest.raises(ExpertUnavailableError, match="not an adapter folder"):
        build_expert(ExpertConfig(kind="caption", model=str(tmp_path / "nowhere")))
    assert build_experts([ExpertConfig(kind="caption", model=str(tmp_path / "nowhere"), optional=True)]) == []
