"""Serving request checks: a server-side image path is read only inside the allowed folders."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.schema import ValidationConfig
from llama_adapter_v2.registry.requests import (
    ImageLimits,
    NotADataURLError,
    RequestError,
    decode_data_url,
    decode_image,
    image_from_bytes,
)

NOT_A_PATH = "image: neither an existing file path inside the served image folders"


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    root, outside = tmp_path / "served", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png())
    (root / "link.png").symlink_to(outside / "secret.png")
    return {"root": root, "outside": outside}


def limits(*roots: Path) -> ImageLimits:
    return ImageLimits.from_validation(ValidationConfig(), roots=roots)


def test_a_path_inside_the_root_is_read_absolute_or_relative(folders: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folders["root"].parent)
    for value in (str(folders["root"] / "inside.png"), "inside.png", "served/inside.png"):
        assert decode_image(value, limits(folders["root"])).size == (16, 16)


@pytest.mark.parametrize("value", ["../outside/secret.png", "{outside}/secret.png", "link.png",
                                   "{root}/../outside/secret.png", "/etc/passwd", "nowhere.png",
                                   "outside/secret.png"])
def test_paths_leading_outside_are_refused_like_missing_ones(folders: dict[str, Path], value: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folders["root"].parent)  # outside/secret.png exists from here, outside the root
    value = value.format(root=folders["root"], outside=folders["outside"])
    with pytest.raises(RequestError, match=NOT_A_PATH):
        decode_image(value, limits(folders["root"]))


def test_no_roots_means_base64_only(folders: dict[str, Path]) -> None:
    with pytest.raises(RequestError, match=NOT_A_PATH):
        decode_image(str(folders["root"] / "inside.png"), limits())
    assert decode_image(base64.b64encode(png()).decode(), limits()).size == (16, 16)


def test_base64_longer_than_a_file_name_is_decoded_not_a_crash(folders: dict[str, Path]) -> None:
    # 300 characters in one path component: Path.is_file raised ENAMETOOLONG (HTTP 500)
    with pytest.raises(RequestError, match="bytes are not a readable image"):
        decode_image("A" * 300, limits(folders["root"]))


def test_default_roots_are_the_data_image_folders(demo_data_config: Config) -> None:
    cfg = demo_data_config.model_copy(deep=True)
    expected = (cfg.data.captions[0].images,)  # the chat source shares the caption images folder
    assert ImageLimits.for_config(cfg).roots == expected
    cfg.serving.image_roots = []
    assert ImageLimits.for_config(cfg).roots == ()


def test_a_decompression_bomb_header_is_a_400_not_a_crash() -> None:
    data = bytearray(png((1, 1)))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(RequestError, match="exceeds the limits"):
        decode_image(base64.b64encode(bytes(data)).decode(), limits())


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["TIFF", "PPM", "ICO", "TGA"])
def test_only_the_common_web_formats_are_parsed(image_format: str) -> None:
    raw = encoded(Image.new("RGB", (16, 16), "red"), image_format)
    with pytest.raises(RequestError, match="not a readable image"):
        decode_image(base64.b64encode(raw).decode(), limits())


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_the_common_web_formats_are_read_from_data_urls(image_format: str) -> None:
    raw = encoded(Image.new("RGB", (16, 16), "red"), image_format)
    url = f"data:image/{image_format.lower()};base64," + base64.b64encode(raw).decode()
    assert decode_image(url, limits()).size == (16, 16)
    assert image_from_bytes(decode_data_url(url, 1 << 20), limits()).mode == "RGB"


@pytest.mark.parametrize("url", ["data:image/png;base64", "data:image/png", "data:image/png,abc",
                                 "data:text/plain;base64,aGk="])
def test_a_malformed_data_url_is_a_request_error(url: str) -> None:
    with pytest.raises(NotADataURLError, match="only data:image"):
        decode_data_url(url, 1 << 20)
    if url.startswith("data:image/"):
        with pytest.raises(RequestError, match="only data:image"):  # was IndexError (a 500)
            decode_image(url, limits())


def test_the_pixel_limit_is_checked_before_pixels_are_decoded() -> None:
    raw = png((64, 64))
    truncated = raw[: len(raw) // 2]  # a header that says 64x64, then too little data to decode
    small = ImageLimits(max_bytes=1 << 20, max_side=4096, max_pixels=32 * 32)
    with pytest.raises(RequestError, match="64x64 exceeds the limits"):
        image_from_bytes(truncated, small)
