"""Generation, chat and multiple-choice scoring on a tiny adapted model (random base, gates off zero)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_adapted import random_gates, tiny_config, write_tiny_base

from llama_adapter_v2.data.formatting import alpaca_prompt
from llama_adapter_v2.evaluate.multiple_choice import (
    ChoiceFileError,
    ChoiceItem,
    choice_log_likelihoods,
    read_choice_items,
    score_multiple_choice,
)
from llama_adapter_v2.infer.batch import answer_requests
from llama_adapter_v2.infer.chat import (
    ChatSession,
    ContextTooLongError,
    answer,
    conversation_prompt,
    fit_history,
    reply,
)
from llama_adapter_v2.infer.generation import (
    GenerationSettings,
    Prompt,
    caption_prompt,
    cut_at_stop,
    generate_completions,
    generate_streamed,
    generate_texts,
    instruction_prompt,
    prompt_ids,
)
from llama_adapter_v2.model.build import build_model, load_tokenizer

GREEDY = GenerationSettings(max_new_tokens=10, stop=())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    cfg = tiny_config(write_tiny_base(tmp_path_factory.mktemp("tiny-base")))
    model = build_model(cfg).eval()
    random_gates(model)
    return model, load_tokenizer(cfg)


def greedy_by_hand(model: Any, tokenizer: Any, prompt: Prompt, steps: int) -> str:
    """Recompute the whole sequence each step and take the argmax: no cache, no padding."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt.text)])
    images = None if prompt.image is None else model.image_transform(prompt.image).unsqueeze(0)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            following = model(ids, images=images).logits[0, -1].argmax()
            ids = torch.cat([ids, following.view(1, 1)], dim=1)
            if int(following) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def prompts() -> list[Prompt]:
    return [
        instruction_prompt("What colour is the sky?"),
        instruction_prompt("Reverse the words.", "red blue green"),
        caption_prompt(Image.new("RGB", (40, 40), "red")),
        caption_prompt(Image.new("RGB", (48, 40), (0, 90, 200))),
        instruction_prompt("Describe it."),
    ]


def test_greedy_matches_recomputing_every_step(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    for prompt in prompts()[1:3]:
        [text] = generate_texts(model, tokenizer, [prompt], GREEDY)
        assert text == greedy_by_hand(model, tokenizer, prompt, GREEDY.max_new_tokens)


def test_batched_left_padded_prompts_match_one_at_a_time(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    batch = prompts()
    together = generate_texts(
        model, tokenizer, batch, GenerationSettings(max_new_tokens=10, stop=(), batch_size=4)
    )
    alone = [generate_texts(model, tokenizer, [p], GREEDY)[0] for p in batch]
    assert together == alone
    assert together[2] != together[3]  # the image changes the caption


def test_stop_string_cuts_the_answer(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = prompts()[1]
    [free] = generate_texts(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=16, stop=()))
    stop = free[3:5]
    assert stop.strip()
    [stopped] = generate_texts(
        model, tokenizer, [prompt], GenerationSettings(max_new_tokens=16, stop=(stop,))
    )
    assert stopped == free[: free.index(stop)].strip()
    assert cut_at_stop("a cat### Human: more", ["###"]) == "a cat"
    assert cut_at_stop("no stop here ", ["###"]) == "no stop here"


def test_token_counts_do_not_depend_on_the_batch_when_padding_is_eos(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    padded_with_eos = copy.deepcopy(tokenizer)
    padded_with_eos.pad_token = padded_with_eos.eos_token  # as for Llama tokenizers without a pad token
    stopping, running = prompts()[1], prompts()[0]
    free, other = generate_texts(model, tokenizer, [stopping, running], GenerationSettings(max_new_tokens=16,
                                                                                         stop=()))
    stop = next(free[i : i + 2] for i in range(len(free) - 1) if free[i : i + 2] not in other)
    settings = GenerationSettings(max_new_tokens=16, stop=(stop,))
    alone = [generate_completions(model, padded_with_eos, [p], settings)[0] for p in (stopping, running)]
    together = generate_completions(model, padded_with_eos, [stopping, running], settings)
    assert alone[0].stopped and alone[0].new_tokens < alone[1].new_tokens  # it ends early in the batch
    assert together == alone


def test_generation_ends_once_cancelled(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=24, stop=())
    whole = generate_streamed(model, tokenizer, prompts()[0], settings, lambda _: None)
    pieces: list[str] = []
    cut = generate_streamed(model, tokenizer, prompts()[0], settings, pieces.append,
                            cancelled=lambda: bool(pieces))
    assert whole.new_tokens == 24 and 0 < cut.new_tokens < whole.new_tokens
    assert whole.text.startswith(cut.text) and not cut.stopped


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    batch = prompts()[:2]
    hot = GenerationSettings(max_new_tokens=10, stop=(), temperature=1.5, seed=3)
    first, again = (
        generate_texts(model, tokenizer, batch, hot),
        generate_texts(model, tokenizer, batch, hot),
    )
    other = generate_texts(
        model, tokenizer, batch, GenerationSettings(max_new_tokens=10, stop=(), temperature=1.5, seed=4)
    )
    assert first == again
    assert first != other
    nucleus_of_one = GenerationSettings(max_new_tokens=10, stop=(), temperature=1.0, top_p=1e-6)
    assert generate_texts(model, tokenizer, batch, nucleus_of_one) == generate_texts(
        model, tokenizer, batch, GREEDY
    )


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    assert GenerationSettings(temperature=1e-300).temperature == 0.0  # greedy, not inf/nan probabilities


def test_chat_keeps_history_and_matches_the_stateless_answer(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    image = Image.new("RGB", (32, 32), "green")
    session = ChatSession(model, tokenizer, image=image, settings=GREEDY)
    first = session.ask("What is drawn?")
    second = session.ask("What colour is it?")
    assert first.kept_history == ()
    assert second.kept_history == (("user", "What is drawn?"), ("assistant", first.text))
    assert session.history == [
        ("user", "What is drawn?"),
        ("assistant", first.text),
        ("user", "What colour is it?"),
        ("assistant", second.text),
    ]
    # the pyfunc route: the same question with the same history gives the same answer
    assert (
        answer(model, tokenizer, image, "What colour is it?", session.history[:2], settings=GREEDY)
        == second.text
    )
    prompt = conversation_prompt(session.history, "And now?")
    assert prompt.endswith("Human: And now?###Assistant:")
    assert f"Human: What is drawn?###Assistant: {first.text}###" in prompt


def test_chat_trims_oldest_exchanges_to_the_context_limit(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    history = [
        turn
        for i in range(6)
        for turn in [("user", f"question number {i}"), ("assistant", f"answer {i}")]
    ]
    full = len(prompt_ids(tokenizer, conversation_prompt(history, "last question")))
    limit = full + GREEDY.max_new_tokens - 1  # one token short: the oldest exchange must go
    result = reply(model, tokenizer, None, "last question", history, settings=GREEDY, limit=limit)
    assert result.kept_history == tuple(history[2:])
    assert result.prompt_tokens + GREEDY.max_new_tokens <= limit
    last_exchange = len(prompt_ids(tokenizer, conversation_prompt(history[-2:], "last question")))
    tight_limit = last_exchange + GREEDY.max_new_tokens
    tight = reply(model, tokenizer, None, "last question", history, settings=GREEDY, limit=tight_limit)
    assert tight.kept_history == tuple(history[-2:])
    assert tight.prompt_tokens == last_exchange
    with pytest.raises(ContextTooLongError, match="context limit of 20 tokens"):
        reply(model, tokenizer, None, "last question", history, settings=GREEDY, limit=20)


def fit_history_one_exchange_at_a_time(tokenizer: Any, history: list[tuple[str, str]], question: str,
                                       limit: int, max_new_tokens: int) -> tuple[Any, str, int]:
    """The linear rule fit_history replaced: drop the oldest whole exchange until the prompt fits."""
    kept = tuple(history)
    while True:
        text = conversation_prompt(kept, question)  # type: ignore[arg-type]
        length = len(prompt_ids(tokenizer, text))
        if length + max_new_tokens <= limit:
            return kept, text, length
        if not kept:
            raise ContextTooLongError(str(length))
        kept = kept[2 if len(kept) >= 2 and kept[0][0] == "user" else 1 :]


class CountingTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls = tokenizer, 0
        self.bos_token_id = tokenizer.bos_token_id

    def encode(self, text: str, **options: Any) -> list[int]:
        self.calls += 1
        return self.tokenizer.encode(text, **options)


def test_fit_history_keeps_what_dropping_one_exchange_at_a_time_kept(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    exchanges = [turn for i in range(40)
                 for turn in [("user", f"question {i} " * (i % 3 + 1)), ("assistant", f"a{i}")]]
    histories = [exchanges, [("assistant", "hello there"), *exchanges[:9]], exchanges[:1], [],
                 [("assistant", "x"), ("assistant", "y"), *exchanges[:6], ("user", "dangling")]]
    for history in histories:
        full = len(prompt_ids(tokenizer, conversation_prompt(history, "last question")))  # type: ignore[arg-type]
        for limit in (full + 4, full + 3, full - 7, full // 2, full // 5, 30, 12):
            counting = CountingTokenizer(tokenizer)
            try:
                expected = fit_history_one_exchange_at_a_time(tokenizer, history, "last question", limit, 4)
            except ContextTooLongError:
                with pytest.raises(ContextTooLongError):
                    fit_history(counting, history, "last question", "", limit=limit, max_new_tokens=4)  # type: ignore[arg-type]
                continue
            found = fit_history(counting, history, "last question", "", limit=limit, max_new_tokens=4)  # type: ignore[arg-type]
            assert found == expected, (len(history), limit)
            assert counting.calls <= 2 + (len(history) + 1).bit_length()  # not one per dropped exchange


def test_session_trims_but_keeps_the_transcript(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    alone = len(prompt_ids(tokenizer, conversation_prompt([("user", "q"), ("assistant", "a")], "q")))
    session = ChatSession(
        model, tokenizer, settings=GenerationSettings(max_new_tokens=4, stop=()), limit=alone + 30
    )
    replies = [session.ask(f"question {i}") for i in range(5)]
    assert len(session.history) == 10
    assert len(replies[-1].kept_history) < 8
    assert all(r.prompt_tokens + 4 <= alone + 30 for r in replies)


def test_choice_log_likelihoods_match_one_unpadded_forward_per_choice(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    item = ChoiceItem("What colour is the sky?", ("blue", "a green triangle at the top", "7"), answer=0)
    scores = choice_log_likelihoods(model, tokenizer, item)
    context = prompt_ids(tokenizer, alpaca_prompt(item.question, ""))
    for choice, (total, count) in zip(item.choices, scores, strict=True):
        continuation = tokenizer.encode(choice, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        expected = sum(float(log_probs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
        assert count == len(continuation)
        assert total == pytest.approx(expected, abs=1e-4)
    result = score_multiple_choice(model, tokenizer, [item, ChoiceItem("Pick one.", ("7", "blue"), answer=1)])
    best = max(range(3), key=lambda i: scores[i][0])
    second = choice_log_likelihoods(model, tokenizer, ChoiceItem("Pick one.", ("7", "blue"), answer=1))
    expected_accuracy = (float(best == 0) + float(second[1][0] > second[0][0])) / 2
    assert result["accuracy"] == expected_accuracy
    assert result["n"] == 2.0


def test_choice_files_in_mmlu_layout_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "mmlu.jsonl"
    good.write_text(
        '{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n\n'
        '{"question": "Sky?", "choices": ["red", "blue"], "answer": "B", "subject": "nature"}\n'
        '{"question": "Grass?", "choices": ["green", "blue"], "answer": "green"}\n',
        encoding="utf-8",
    )
    assert [item.answer for item in read_choice_items(good)] == [1, 1, 0]
    assert read_choice_items(good)[1].subject == "nature"
    cases = {
        '{"question": "q", "choices": ["a"], "answer": 0}': "at least two",
        '{"question": "q", "choices": ["a", "b"], "answer": 2}': "not a choice index",
        '{"question": "", "choices": ["a", "b"], "answer": 0}': "'question'",
        '{"question": "q", "choices": ["a", "b"], "answer": 0': "not valid JSON",
        '["q"]': "JSON object",
    }
    for line, rule in cases.items():
        bad = tmp_path / "bad.jsonl"
        first = '{"question": "ok", "choices": ["a", "b"], "answer": 0}'
        bad.write_text(f"{first}\n{line}\n", encoding="utf-8")
        with pytest.raises(ChoiceFileError, match=rf"bad.jsonl:2: .*{rule}"):
            read_choice_items(bad)


def test_batch_requests_answer_good_lines_and_name_bad_ones(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), "red").save(images / "red.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), "blue").save(secret)
    (images / "link.png").symlink_to(secret)
    lines = [
        '{"id": "a", "image": "red.png", "prompt": "Generate caption of this image"}',
        '{"prompt": "What colour is the sky?"}',
        '{"id": "c", "prompt": "x", "image": "missing.png"}',
        "{not json",
        '{"id": "e", "image": "red.png"}',
        '{"prompt": "x", "image": "broken.png"}',
        '{"prompt": "x", "image": "../secret.png"}',
        '{"prompt": "x", "image": "link.png"}',
        "",
        '{"id": "i", "image": "red.png", "prompt": "Describe it.", "input": "context"}',
    ]
    requests = images / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    answered, failed = answer_requests(model, tokenizer, requests, out, settings=GREEDY)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (answered, failed) == (3, 6)
    assert [row["line"] for row in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 10]  # blank line 9 is no request
    errors = {row["line"]: row["error"] for row in rows if "error" in row}
    assert "image_missing" in errors[3] and "bad_json" in errors[4] and "prompt_missing" in errors[5]
    assert "image_unreadable" in errors[6]
    assert "image_outside_root" in errors[7] and "image_outside_root" in errors[8]
    assert all(str(requests) + ":" in message for message in errors.values())
    assert rows[0]["id"] == "a" and rows[2]["id"] == "c" and rows[4]["id"] == "e"
    expected = generate_texts(model, tokenizer, [
        caption_prompt(Image.new("RGB", (40, 40), "red")), instruction_prompt("What colour is the sky?"),
        instruction_prompt("Describe it.", "context", Image.new("RGB", (40, 40), "red")),
    ], GREEDY)
    assert [rows[0]["text"], rows[1]["text"], rows[-1]["text"]] == expected
