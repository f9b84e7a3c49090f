"""Checks on one serving request row, before any tensor is made.

Every failure is a ``RequestError`` naming the field and the rule, so the pyfunc can turn it into
an HTTP 400 with that message instead of a 500 with a stack trace.

An image may be base64 or a path on the server. A path is read only when it resolves, symlinks
followed, inside one of the allowed folders (``serving.image_roots``; by default the data
sources' image folders): a request must not make the server read ``/etc/passwd`` or the model's
own files. A relative path is taken from the server's current folder, then from each allowed
folder; either way it must end inside one. A path outside gets
the same answer as a path that does not exist, so requests cannot probe the server's files.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from llama_adapter_v2.config.schema import Config, ValidationConfig
from llama_adapter_v2.data.containment import OutsideRootError, resolve_inside, usable_path_text

DATA_URL_PREFIX = "data:image/"
ROLES = {"user", "assistant"}


class RequestError(ValueError):
    """A malformed request: the message names the field and the broken rule."""


class NotADataURLError(RequestError):
    """An image given in a form other than a base64 ``data:image/...`` URL."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int
    max_pixels: int
    roots: tuple[Path, ...] = ()  # where a server-side path may lead; empty: base64 only

    @classmethod
    def from_validation(cls, rules: ValidationConfig, max_bytes: int = 10 * 1024 * 1024,
                        roots: tuple[Path, ...] = ()) -> ImageLimits:
        return cls(max_bytes=max_bytes, max_side=rules.image_max_side, max_pixels=rules.max_image_pixels,
                   roots=roots)

    @classmethod
    def for_config(cls, cfg: Config) -> ImageLimits:
        roots = tuple(cfg.serving.allowed_image_roots(cfg.data))
        return cls.from_validation(cfg.data.validation, roots=roots)


def _server_file(value: str, roots: tuple[Path, ...]) -> Path | None:
    """The regular file ``value`` names inside one of ``roots``, resolved; None otherwise."""
    if len(value) >= 4096 or value.startswith(DATA_URL_PREFIX) or not usable_path_text(value):
        return None
    for root in roots:
        for candidate in (os.path.abspath(value), value):  # from the server's folder, or from the root
            try:
                resolved = resolve_inside(root, candidate)
            except (OutsideRootError, ValueError):
                continue
            if os.path.isfile(resolved):  # False, not an error, for names too long for the file system
                return resolved
    return None


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow may parse: no EPS, TIFF, ICNS...


def _base64_bytes(encoded: str, max_bytes: int, invalid: str) -> bytes:
    if len(encoded) * 3 // 4 > max_bytes:
        raise RequestError(f"image: base64 payload is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(invalid) from None


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/<type>;base64,<payload>`` URL; ``NotADataURLError`` for any other form."""
    header, comma, payload = url.partition(",")
    if not (comma and header.startswith(DATA_URL_PREFIX) and header.endswith(";base64")):
        raise NotADataURLError("image: only data:image/<type>;base64,<bytes> URLs are accepted")
    return _base64_bytes(payload, max_bytes, "image: the data URL's payload is not valid base64")


def _image_bytes(value: str, limits: ImageLimits) -> bytes:
    path = _server_file(value, limits.roots)
    if path is not None:
        if path.stat().st_size > limits.max_bytes:
            raise RequestError(f"image: file {value} is larger than {limits.max_bytes} bytes")
        return path.read_bytes()
    if value.startswith(DATA_URL_PREFIX):
        return decode_data_url(value, limits.max_bytes)
    return _base64_bytes(value, limits.max_bytes, "image: neither an existing file path inside the served "
                         "image folders (serving.image_roots) nor valid base64")


def image_from_bytes(raw: bytes, limits: ImageLimits) -> Image.Image:
    """An RGB image from encoded bytes in one of ``IMAGE_FORMATS``; its size is checked from the header
    (``Image.open`` reads no more) before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise RequestError(f"image: exceeds the limits ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise RequestError(f"image: bytes are not a readable image ({', '.join(IMAGE_FORMATS)})") from None
    width, height = image.size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise RequestError(
            f"image: {width}x{height} exceeds the limits (side <= {limits.max_side}, "
            f"pixels <= {limits.max_pixels})"
        )
    try:
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise RequestError(f"image: cannot be decoded ({err})") from None


def decode_image(value: object, limits: ImageLimits) -> Image.Image:
    """An RGB image from a file path or base64 (plain or a data URL), within the size limits."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError("image: missing (give a file path or base64-encoded image bytes)")
    return image_from_bytes(_image_bytes(value.strip(), limits), limits)


def check_instruction(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError("instruction: must be a non-empty string")
    return value.strip()


def parse_history(value: object) -> list[tuple[str, str]]:
    """Earlier turns as (role, text): a JSON list of {"role": "user"|"assistant", "content": str}."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return []
    try:
        turns = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise RequestError(f"history: not valid JSON ({err.msg})") from None
    if not isinstance(turns, list):
        raise RequestError("history: must be a JSON list of {role, content} turns")
    parsed = []
    for index, turn in enumerate(turns):
        well_formed = isinstance(turn, dict) and isinstance(turn.get("content"), str)
        if not well_formed or turn.get("role") not in ROLES:
            raise RequestError(f"history[{index}]: needs role in {sorted(ROLES)} and a string content")
        parsed.append((turn["role"], turn["content"]))
    return parsed
