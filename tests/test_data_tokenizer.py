"""The demo tokenizer: trained in memory, saved, reloaded offline with its special tokens."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from llama_adapter_v2.data.tokenizer import train_tokenizer

TEXTS = ["A red circle on the left.", "What is 2 plus 3?###Assistant: 5###", "Reverse: cat dog"] * 20


def test_train_save_and_reload_offline(tmp_path: Path) -> None:
    trained = train_tokenizer(TEXTS, 300, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (trained.unk_token, trained.bos_token, trained.eos_token, trained.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>")
    assert [reloaded.unk_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id] == [
        0, 1, 2, 3]
    text = "A blue square on the right. Olé → 7"
    ids = reloaded.encode(text, add_special_tokens=False)
    assert ids == trained.encode(text, add_special_tokens=False)
    assert reloaded.decode(ids) == text  # byte-level: unseen characters still round-trip
    assert len(reloaded) <= 300
