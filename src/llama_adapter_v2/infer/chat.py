"""Multi-turn chat about one image, with the history trimmed oldest-first to the context limit.

The same functions serve the terminal (``lav2 chat``) and the registered pyfunc's ``history``
input: one question without history uses the Alpaca template (expert text in its input slot),
a question with history uses the chat template of docs/METHOD.md §5. When the prompt and the
answer would not fit in the base model's positions, whole exchanges are dropped from the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from llama_adapter_v2.data.formatting import alpaca_prompt, prompt_text
from llama_adapter_v2.data.records import Record, Role, Turn
from llama_adapter_v2.infer.expert_text import Expert, expert_context
from llama_adapter_v2.infer.generation import GenerationSettings, Prompt, generate_texts, prompt_ids
from llama_adapter_v2.model.adapter import LlamaAdapterV2

History = Sequence[tuple[Role, str]]


class ContextTooLongError(ValueError):
    """The question alone does not fit in the context window."""


@dataclass(frozen=True)
class Reply:
    text: str
    kept_history: tuple[tuple[Role, str], ...]
    prompt_tokens: int


def conversation_prompt(history: History, instruction: str, context: str = "") -> str:
    """Alpaca prompt for a first question, chat prompt when there are earlier turns."""
    if not history:
        return alpaca_prompt(instruction, context)
    question = f"{context}\n{instruction}" if context else instruction
    turns = tuple(Turn(role, text) for role, text in history)
    turns += (Turn("user", question), Turn("assistant", ""))
    return prompt_text(Record(id="chat", source="chat", kind="instruction", template="chat", turns=turns))


def fit_history(
    tokenizer: Any, history: History, instruction: str, context: str, *, limit: int, max_new_tokens: int
) -> tuple[tuple[tuple[Role, str], ...], str, int]:
    """The newest history that leaves room for the answer: (kept turns, prompt text, prompt tokens)."""
    kept = tuple(history)
    while True:
        text = conversation_prompt(kept, instruction, context)
        length = len(prompt_ids(tokenizer, text))
        if length + max_new_tokens <= limit:
            return kept, text, length
        if not kept:
            raise ContextTooLongError(
                f"the question alone is {length} tokens; with {max_new_tokens} new tokens it exceeds "
                f"the context limit of {limit} tokens"
            )
        drop = 2 if len(kept) >= 2 and kept[0][0] == "user" else 1  # one whole exchange at a time
        kept = kept[drop:]


def context_limit(model: LlamaAdapterV2) -> int:
    """Text positions of the base model (visual and adaptation prompts use none)."""
    return int(model.base.config.max_position_embeddings)


def reply(
    model: LlamaAdapterV2,
    tokenizer: Any,
    image: Image.Image | None,
    instruction: str,
    history: History = (),
    *,
    settings: GenerationSettings | None = None,
    context: str = "",
    limit: int | None = None,
) -> Reply:
    """Answer ``instruction`` about ``image`` after ``history``; says which history was kept."""
    settings = settings or GenerationSettings()
    kept, text, length = fit_history(
        tokenizer, history, instruction, context,
        limit=limit or context_limit(model), max_new_tokens=settings.max_new_tokens,
    )
    [answer_text] = generate_texts(model, tokenizer, [Prompt(text, image)], settings)
    return Reply(text=answer_text, kept_history=kept, prompt_tokens=length)


def answer(
    model: LlamaAdapterV2,
    tokenizer: Any,
    image: Image.Image | None,
    instruction: str,
    history: History = (),
    *,
    settings: GenerationSettings | None = None,
    experts: Sequence[Expert] = (),
) -> str:
    """The answer text (what the registered pyfunc returns for one request row)."""
    context = expert_context(experts, image)
    return reply(model, tokenizer, image, instruction, history, settings=settings, context=context).text


@dataclass
class ChatSession:
    """A conversation about one image; keeps the whole transcript, prompts with what fits."""

    model: LlamaAdapterV2
    tokenizer: Any
    image: Image.Image | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    experts: Sequence[Expert] = ()
    limit: int | None = None
    history: list[tuple[Role, str]] = field(default_factory=list)
    _context: str | None = None

    def ask(self, instruction: str) -> Reply:
        if self._context is None:
            self._context = expert_context(self.experts, self.image)
        result = reply(
            self.model, self.tokenizer, self.image, instruction, self.history,
            settings=self.settings, context=self._context, limit=self.limit,
        )
        self.history += [("user", instruction), ("assistant", result.text)]
        return result
