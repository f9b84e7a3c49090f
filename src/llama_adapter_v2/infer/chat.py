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


def _exchange_starts(history: History) -> list[int]:
    """Where the kept history may start, oldest first: dropping one whole exchange at a time."""
    starts, start = [0], 0
    while start < len(history):
        start += 2 if len(history) - start >= 2 and history[start][0] == "user" else 1
        starts.append(start)
    return starts


def fit_history(
    tokenizer: Any, history: History, instruction: str, context: str, *, limit: int, max_new_tokens: int
) -> tuple[tuple[tuple[Role, str], ...], str, int]:
    """The newest history that leaves room for the answer: (kept turns, prompt text, prompt tokens).

    The oldest kept exchange is found by binary search (a shorter history never makes a longer
    prompt), so a long conversation costs a few tokenizations rather than one per dropped exchange.
    """
    turns = tuple(history)
    starts = _exchange_starts(turns)

    def attempt(index: int) -> tuple[tuple[tuple[Role, str], ...], str, int]:
        kept = turns[starts[index]:]
        text = conversation_prompt(kept, instruction, context)
        return kept, text, len(prompt_ids(tokenizer, text))

    def fits(found: tuple[Any, str, int]) -> bool:
        return found[2] + max_new_tokens <= limit

    best = attempt(0)
    if fits(best):
        return best
    low, high = 0, len(starts) - 1  # starts[low] does not fit; starts[high] is checked next
    best = attempt(high)
    if not fits(best):
        raise ContextTooLongError(
            f"the question alone is {best[2]} tokens; with {max_new_tokens} new tokens it exceeds "
            f"the context limit of {limit} tokens"
        )
    while high - low > 1:
        middle = (low + high) // 2
        found = attempt(middle)
        if fits(found):
            high, best = middle, found
        else:
            low = middle
    return best


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
