"""Text generation on the adapted model: greedy or sampled, stop strings, batched prompts, streaming.

Prompts are tokenized exactly as training tokenized them (BOS, then the template text without
special tokens) and left-padded, so a batch of prompts continues from the same position as each
prompt alone. Prompts with and without an image are generated in separate batches because
the model's visual prompts apply to a whole batch. A streamed answer is handed over in pieces
that join to exactly the text the same prompt gets unstreamed (see ``TextPieces``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from llama_adapter_v2.data.formatting import CHAT_SEPARATOR, alpaca_prompt
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION
from llama_adapter_v2.model.adapter import LlamaAdapterV2

log = logging.getLogger(__name__)
_LAST_WORD = re.compile(r"\s+\S*$")


GREEDY_BELOW = 1e-5  # logits divided by a smaller temperature overflow to inf, probabilities to nan


@dataclass(frozen=True)
class GenerationSettings:
    """``temperature == 0`` is greedy decoding; otherwise sampling with nucleus ``top_p``.

    A temperature below ``GREEDY_BELOW`` is greedy decoding, which is what it tends to anyway.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = (CHAT_SEPARATOR,)
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Prompt:
    """A full prompt text (template already applied) and an optional RGB image."""

    text: str
    image: Image.Image | None = None


def instruction_prompt(instruction: str, context: str = "", image: Image.Image | None = None) -> Prompt:
    """The Alpaca template with an optional input (expert text goes there too)."""
    return Prompt(alpaca_prompt(instruction, context), image)


def caption_prompt(image: Image.Image, instruction: str = CAPTION_INSTRUCTION) -> Prompt:
    return Prompt(alpaca_prompt(instruction, ""), image)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """BOS (when the tokenizer has one) and the text without special tokens, as in training."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


@dataclass(frozen=True)
class Completion:
    """An answer and how it ended: ``stopped`` by EOS or a stop string, else cut at ``max_new_tokens``."""

    text: str
    new_tokens: int
    stopped: bool


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string, stripped."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut].strip()


def _completion(tokenizer: Any, generated: list[int], stop: Sequence[str], stopped_at: int | None
                ) -> Completion:
    """A row of ``generate``'s new tokens as an answer, counted up to its EOS or the token that completed a
    stop string (``stopped_at``): a row finished early in a batch is padded, and the padding (which
    may be the EOS token itself) is no part of the answer."""
    ends = [n for n in (stopped_at, _eos_end(tokenizer, generated)) if n is not None]
    count = min(ends, default=len(generated))
    raw = tokenizer.decode(generated[:count], skip_special_tokens=True)
    return Completion(cut_at_stop(raw, stop), count, bool(ends))


def _eos_end(tokenizer: Any, generated: list[int]) -> int | None:
    eos = tokenizer.eos_token_id
    return generated.index(eos) + 1 if eos is not None and eos in generated else None


class TextPieces:
    """A transformers streamer for one prompt: hands ``on_text`` each piece of the answer once it is settled.

    A piece is settled when later tokens cannot change it: text up to the last whitespace (a word
    may still grow, or a byte-fallback character complete) and never what could be the start of a
    stop string. ``finish`` hands over the rest of the final answer, so the pieces joined equal the
    unstreamed answer (stripped and cut at the first stop string).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.stop, self.on_text = tokenizer, tuple(s for s in stop if s), on_text
        self.ids: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._send(self._settled(self.tokenizer.decode(self.ids, skip_special_tokens=True)))

    def end(self) -> None:
        """Part of the streamer protocol; the rest is handed over by ``finish`` with the final text."""

    def _settled(self, text: str) -> str:
        if any(s in text for s in self.stop):
            return cut_at_stop(text, self.stop)
        text = text.lstrip()
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - held]
        last_word = _LAST_WORD.search(text)
        return text[: last_word.start()] if last_word else ""

    def _send(self, settled: str) -> None:
        if settled.startswith(self.sent) and len(settled) > len(self.sent):
            piece, self.sent = settled[len(self.sent) :], settled
            self.on_text(piece)

    def finish(self, final: str) -> None:
        if not final.startswith(self.sent):  # the tokenizer decoded a longer sequence differently
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent, final)
            return
        self._send(final)


class _StopStrings:
    """Stops a row once its generated text contains a stop string (checked on decoded text), and
    remembers how many new tokens it had then; also stops every row once ``cancelled()`` says so."""

    def __init__(self, tokenizer: Any, prompt_length: int, stop: Sequence[str],
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, tuple(s for s in stop if s)
        self.cancelled = cancelled
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        new_tokens = input_ids.shape[1] - self.prompt_length
        if self.cancelled is not None and self.cancelled():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        for row, row_done in enumerate(done):
            if row_done:
                self.stopped_at.setdefault(row, new_tokens)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids, mask


def _image_batch(model: LlamaAdapterV2, prompts: Sequence[Prompt]) -> torch.Tensor | None:
    if prompts[0].image is None:
        return None
    if model.image_transform is None:
        raise ValueError("an image was given but this model has no visual path")
    device = next(model.parameters()).device
    return torch.stack([model.image_transform(p.image.convert("RGB")) for p in prompts]).to(device)


def _generate_batch(
    model: LlamaAdapterV2,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    *,
    streamer: TextPieces | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[Completion]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = _left_padded([prompt_ids(tokenizer, p.text) for p in prompts], pad_id)
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": False}
    if settings.temperature > 0:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        sampling["top_k"] = 0  # nucleus sampling only, not transformers' default top-50 cut
    stop_strings = _StopStrings(tokenizer, input_ids.shape[1], settings.stop, cancelled)
    output = model.generate(
        input_ids.to(device),
        images=_image_batch(model, prompts),
        attention_mask=attention_mask.to(device),
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList([stop_strings]),
        streamer=streamer,
        **sampling,
    )
    rows = output[:, input_ids.shape[1] :].tolist()
    return [_completion(tokenizer, row, settings.stop, stop_strings.stopped_at.get(index))
            for index, row in enumerate(rows)]


def generate_completions(
    model: LlamaAdapterV2,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    *,
    cancelled: Callable[[], bool] | None = None,
) -> list[Completion]:
    """One answer per prompt, in order, and how it ended. Sampling is seeded by ``settings.seed`` per call.

    ``cancelled`` is asked after every token; once it says True, every answer ends where it is."""
    settings = settings or GenerationSettings()
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    answers: dict[int, Completion] = {}
    for with_image in (False, True):
        indices = [i for i, p in enumerate(prompts) if (p.image is not None) == with_image]
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            found = _generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings,
                                    cancelled=cancelled)
            answers.update(zip(chunk, found, strict=True))
    return [answers[i] for i in range(len(prompts))]


def generate_texts(
    model: LlamaAdapterV2,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
) -> list[str]:
    """One answer text per prompt, in order (see ``generate_completions``)."""
    return [completion.text for completion in generate_completions(model, tokenizer, prompts, settings)]


def generate_streamed(
    model: LlamaAdapterV2,
    tokenizer: Any,
    prompt: Prompt,
    settings: GenerationSettings,
    on_text: Callable[[str], None],
    *,
    cancelled: Callable[[], bool] | None = None,
) -> Completion:
    """One answer, handed to ``on_text`` in pieces as it is generated; they join to the returned text."""
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    pieces = TextPieces(tokenizer, settings.stop, on_text)
    [completion] = _generate_batch(model, tokenizer, [prompt], settings, streamer=pieces,
                                   cancelled=cancelled)
    pieces.finish(completion.text)
    return completion
