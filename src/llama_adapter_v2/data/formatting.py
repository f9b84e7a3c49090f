"""Prompt templates and loss masks (docs/METHOD.md §5).

The model learns only what the assistant says: every prompt, system and user token gets the
label -100, every response token (and the closing EOS) its own id. The prompt and each response
are tokenized separately so the boundary between masked and learned tokens is exact.
"""

from __future__ import annotations

import re
from typing import Protocol

from llama_adapter_v2.data.records import Record

IGNORE_INDEX = -100
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
CHAT_SYSTEM = "A chat with a helpful assistant."
CHAT_SEPARATOR = "###"
_PLACEHOLDER_WORDS = {"noinput", "none", "na"}


class Tokenizer(Protocol):
    """What formatting needs from a tokenizer: the base model's own (any HF tokenizer fits)."""

    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def is_placeholder_input(text: str) -> bool:
    """"", "No input", "<noinput>", "(No input)", "[noinput]", "N/A", "None": no real input was given.

    Punctuation and case are ignored around the words, but an input of punctuation only (Morse
    code, "+") is real content.
    """
    return not text.strip() or re.sub(r"[^0-9a-z]", "", text.lower()) in _PLACEHOLDER_WORDS


def alpaca_prompt(instruction: str, context: str) -> str:
    """The Alpaca prompt up to ``### Response:``; the no-input form for placeholder inputs."""
    if is_placeholder_input(context):
        return f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:"
    return f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:"


def segments(record: Record) -> list[tuple[str, bool]]:
    """The record as (text, carries_loss) pieces in order; their concatenation is the full text."""
    if record.template == "alpaca":
        return [(alpaca_prompt(record.instruction, record.input), False), (record.response, True)]
    pieces: list[tuple[str, bool]] = [(CHAT_SYSTEM + "\n", False)]
    for turn in record.turns:
        if turn.role == "user":
            pieces.append((f"Human: {turn.text}{CHAT_SEPARATOR}", False))
        else:
            pieces.append(("Assistant:", False))
            pieces.append((f" {turn.text}{CHAT_SEPARATOR}", True))
    return pieces


def prompt_text(record: Record) -> str:
    """The text a model is given at generation time: everything before the last answer."""
    pieces = segments(record)
    last_answer = max(i for i, (_, learned) in enumerate(pieces) if learned)
    return "".join(text for text, _ in pieces[:last_answer])


def encode_full(record: Record, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) of the whole record: BOS, the segments, EOS (learned)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the response end cannot be learned")
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, learned in segments(record):
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if learned else [IGNORE_INDEX] * len(ids))
    return [*input_ids, tokenizer.eos_token_id], [*labels, tokenizer.eos_token_id]


def truncate(input_ids: list[int], labels: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """At most ``max_tokens``, the tail cut but the final EOS kept, so the model still learns to stop."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (BOS/first token + EOS), got {max_tokens}")
    if len(input_ids) <= max_tokens:
        return input_ids, labels
    return [*input_ids[: max_tokens - 1], input_ids[-1]], [*labels[: max_tokens - 1], labels[-1]]


def encode_record(record: Record, tokenizer: Tokenizer, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one record, at most ``max_tokens`` long.

    BOS (if the tokenizer has one) starts the sequence; EOS ends it and is learned. Truncation
    cuts the tail but always keeps EOS as the last token, so the model still learns to stop.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (BOS/first token + EOS), got {max_tokens}")
    return truncate(*encode_full(record, tokenizer), max_tokens)
