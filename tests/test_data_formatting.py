"""Prompt templates and loss masks (docs/METHOD.md §5) on the demo tokenizer."""

from __future__ import annotations

import pytest

from llama_adapter_v2.data.formatting import (
    ALPACA_PREAMBLE,
    CHAT_SYSTEM,
    IGNORE_INDEX,
    alpaca_prompt,
    encode_record,
    prompt_text,
)
from llama_adapter_v2.data.records import CAPTION_INSTRUCTION, Record, Turn, caption_record


def alpaca(instruction: str, context: str, output: str) -> Record:
    return Record("t:0", "t", "instruction", "alpaca", (Turn("user", instruction), Turn("assistant", output)),
                  input=context)


@pytest.mark.parametrize(
    "placeholder", ["", "  ", "No input", "No input.", "<noinput>", "Noinput", "noinput", "<No input>",
                    "<No Input>", "< noinput >", "No Input", "N/A", "None", "(No input)", "[noinput]",
                    '"<noinput>"'],
)
def test_placeholder_inputs_select_the_template_without_input(placeholder: str) -> None:
    assert alpaca_prompt("Name a colour.", placeholder) == (
        ALPACA_PREAMBLE + "### Instruction:\nName a colour.\n\n### Response:"
    )


@pytest.mark.parametrize("real_input",
                         ["John", "No inputs were harmed", "2+2", "<NEWS ARTICLE>", "+", "-- .-"])
def test_real_inputs_select_the_template_with_input(real_input: str) -> None:
    assert alpaca_prompt("Do it.", real_input) == (
        ALPACA_PREAMBLE + f"### Instruction:\nDo it.\n\n### Input:\n{real_input}\n\n### Response:"
    )


def test_captions_use_the_fixed_caption_instruction() -> None:
    record = caption_record("c:1", "c", "A red circle.", "img.png", {})
    expected = ALPACA_PREAMBLE + f"### Instruction:\n{CAPTION_INSTRUCTION}\n\n### Response:"
    assert prompt_text(record) == expected


def learned_ids(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE_INDEX]


def test_only_the_response_and_eos_carry_loss(demo_tokenizer) -> None:
    record = alpaca("What is 2 plus 3?", "", "5")
    ids, labels = encode_record(record, demo_tokenizer, 256)
    prompt = demo_tokenizer.encode(prompt_text(record), add_special_tokens=False)
    response = demo_tokenizer.encode("5", add_special_tokens=False)
    eos, bos = demo_tokenizer.eos_token_id, demo_tokenizer.bos_token_id
    assert ids == [bos, *prompt, *response, eos]
    assert labels == [IGNORE_INDEX] * (1 + len(prompt)) + [*response, eos]


def test_chat_keeps_every_turn_and_learns_only_assistant_turns(demo_tokenizer) -> None:
    turns = (Turn("user", "What is 1 plus 1?"), Turn("assistant", "2"),
             Turn("user", "And if you add 3 more?"), Turn("assistant", "5"))
    record = Record("chat:0", "chat", "instruction", "chat", turns)
    ids, labels = encode_record(record, demo_tokenizer, 256)
    text = demo_tokenizer.decode(ids, skip_special_tokens=True)
    assert text == (f"{CHAT_SYSTEM}\nHuman: What is 1 plus 1?###Assistant: 2###"
                    "Human: And if you add 3 more?###Assistant: 5###")
    assert demo_tokenizer.decode(learned_ids(labels)) == " 2### 5###</s>"
    assert prompt_text(record).endswith("Human: And if you add 3 more?###Assistant:")


def test_eos_survives_truncation(demo_tokenizer) -> None:
    record = alpaca("Repeat the words exactly.", "cat dog sun tree", "cat dog sun tree " * 20)
    full_ids, _ = encode_record(record, demo_tokenizer, 4096)
    ids, labels = encode_record(record, demo_tokenizer, 60)
    assert len(full_ids) > 60
    assert len(ids) == len(labels) == 60
    assert ids[-1] == labels[-1] == demo_tokenizer.eos_token_id
    assert ids[:59] == full_ids[:59]


def test_a_prompt_longer_than_the_limit_still_ends_with_a_learned_eos(demo_tokenizer) -> None:
    ids, labels = encode_record(alpaca("Say yes.", "", "yes"), demo_tokenizer, 8)
    assert labels == [IGNORE_INDEX] * 7 + [demo_tokenizer.eos_token_id]
    assert len(ids) == 8


def test_max_tokens_below_two_is_refused(demo_tokenizer) -> None:
    with pytest.raises(ValueError, match="max_tokens must be at least 2"):
        encode_record(alpaca("a", "", "b"), demo_tokenizer, 1)


def test_alpaca_records_need_exactly_one_exchange() -> None:
    with pytest.raises(ValueError, match="one user and one assistant turn"):
        Record("x:1", "x", "instruction", "alpaca", (Turn("user", "a"), Turn("assistant", "b"),
                                                     Turn("user", "c"), Turn("assistant", "d")))
