"""The request body of ``POST /v1/chat/completions``: the part of OpenAI's shape this model can honour.

Text and images (as ``image_url`` parts) in user messages, earlier turns, and the sampling
parameters ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``,
``stop`` and ``stream``. Other OpenAI parameters (penalties, logprobs, tools...) are accepted
and ignored, as a client may send them by default; ``n`` above 1 is refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_MESSAGES = 256  # bounds the work of fitting a conversation to the context before it is refused
INT64 = 2**63  # seeds go to torch.manual_seed, which takes a 64-bit integer


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(Lenient):
    url: str
    detail: str | None = None


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class ChatRequest(Lenient):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        given = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in given if s)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
