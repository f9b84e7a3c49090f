"""OpenAI messages as the model's chat: one image, earlier turns, the question, the prompt that fits.

The model sees at most one image per conversation (its visual prompts are per prompt), so a
second image is refused rather than silently dropped. Images come only as ``data:image/...;base64``
URLs: the server fetches nothing and reads no file a request names. System (and developer)
messages are accepted and not used: the model was tuned on its templates' fixed preamble, which
has no slot for them. The prompt is built and trimmed oldest-exchange-first by ``infer.chat``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from llama_adapter_v2.data.formatting import CHAT_SEPARATOR
from llama_adapter_v2.data.records import Role
from llama_adapter_v2.infer.chat import ContextTooLongError, fit_history
from llama_adapter_v2.infer.generation import GenerationSettings, Prompt
from llama_adapter_v2.registry.requests import (
    ImageLimits,
    NotADataURLError,
    RequestError,
    decode_data_url,
    image_from_bytes,
)
from llama_adapter_v2.serve.errors import APIError
from llama_adapter_v2.serve.schema import ChatRequest, ImagePart, Message, TextPart

UNUSED_ROLES = {"system", "developer"}


@dataclass(frozen=True)
class ChatInput:
    image: Image.Image | None
    history: tuple[tuple[Role, str], ...]
    question: str


@dataclass(frozen=True)
class FittedPrompt:
    prompt: Prompt
    prompt_tokens: int
    settings: GenerationSettings


def _image(url: str, param: str, limits: ImageLimits) -> Image.Image:
    try:
        return image_from_bytes(decode_data_url(url, limits.max_bytes), limits)
    except NotADataURLError:
        raise APIError(400, "image_url: only data:image/...;base64,... URLs are accepted (the server "
                       "fetches nothing); embed the image bytes", param=param,
                       code="invalid_image_url") from None
    except RequestError as err:
        raise APIError(400, str(err), param=param, code="invalid_image") from None


def _text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "\n".join(part.text for part in message.content if isinstance(part, TextPart))


def _image_parts(messages: list[Message]) -> list[tuple[str, str, int]]:
    """Every image part as (its URL, its param, its message); refused unless in a user message."""
    found = []
    for index, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str) or message.role in UNUSED_ROLES:
            continue
        for position, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                param = f"messages[{index}].content[{position}].image_url.url"
                if message.role != "user":
                    raise APIError(400, "images are accepted in user messages only", param=param)
                found.append((part.image_url.url, param, index))
    return found


def chat_input(messages: list[Message], limits: ImageLimits) -> ChatInput:
    """The conversation's image, its earlier turns and the last user message's text.

    Image parts are counted before any is decoded: a small body may carry many small, highly
    compressed images of huge size, and only one is ever used.
    """
    images = _image_parts(messages)
    if len(images) > 1:
        raise APIError(400, "this model answers about one image per conversation; start a new "
                       "conversation for another image", param=f"messages[{images[1][2]}].content")
    image = _image(images[0][0], images[0][1], limits) if images else None
    turns = [(m.role, _text(m).strip()) for m in messages if m.role not in UNUSED_ROLES]
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    if not turns[-1][1]:
        raise APIError(400, "the last user message has no text", param=f"messages[{len(messages) - 1}]")
    return ChatInput(image=image, history=tuple(turns[:-1]), question=turns[-1][1])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Defaults:
    """What a request that does not say gets: ``lav2 chat``'s greedy decoding, up to ``max_tokens``."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


def fitted_prompt(request: ChatRequest, chat: ChatInput, tokenizer: Any, *, limit: int, defaults: Defaults,
                  seed: int) -> FittedPrompt:
    """The prompt (history trimmed to fit) and its settings; 400 when the question alone does not fit.

    Without ``max_tokens`` the answer may use what the prompt leaves of the context, up to the default.
    """
    asked = request.token_limit()
    try:
        _, text, length = fit_history(tokenizer, chat.history, chat.question, "", limit=limit,
                                      max_new_tokens=asked or 1)
    except ContextTooLongError as err:
        raise APIError(400, f"{err}; shorten the question or lower max_tokens", param="messages",
                       code="context_length_exceeded") from None
    settings = GenerationSettings(
        max_new_tokens=asked or min(defaults.max_tokens, limit - length),
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        stop=(CHAT_SEPARATOR, *request.stop_strings()),
        seed=seed,
    )
    if settings.temperature == 0:
        settings = replace(settings, seed=0)  # greedy requests share settings, so they batch
    return FittedPrompt(Prompt(text, chat.image), length, settings)
