"""The demo's frozen base is a trained LM: its loss drops clearly and the folder reloads offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_project import tiny_config
from transformers import AutoTokenizer, LlamaForCausalLM

from llama_adapter_v2.data.demo import reading_tasks
from llama_adapter_v2.train.demo_base import demo_records, plain_text, reading_records, train_demo_base

# Recorded from a real run (30 steps of the tiny base on the tiny demo text, CPU, fp32).
FIRST_LOSS, LAST_LOSS = 5.7658, 4.1934


def test_demo_base_loss_drops_and_the_folder_is_a_working_hf_model(
    tiny_project: Path, tmp_path: Path
) -> None:

    losses = json.loads((tiny_project.parent / "base_losses.json").read_text())
    assert len(losses) == 30
    assert losses[0] == pytest.approx(FIRST_LOSS, abs=0.02)
    assert losses[-1] == pytest.approx(LAST_LOSS, abs=0.02)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0

    cfg = tiny_config(tiny_project, tmp_path)  # validation compares arch with the saved config.json
    folder = cfg.model.base.path
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.vocab_size == 320 and model.config.num_hidden_layers == 2
    assert len(tokenizer) <= model.config.vocab_size
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    text = plain_text(demo_records(cfg, split="train")[0])
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < LAST_LOSS + 0.5  # it learned the demo text


def test_the_base_never_sees_held_out_text(tiny_project: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_project, tmp_path)
    everything, train_only = demo_records(cfg), demo_records(cfg, split="train")
    held_out = {r.id for r in demo_records(cfg, split="holdout")}
    assert held_out and not held_out & {r.id for r in train_only}
    assert len(train_only) + len(held_out) == len(everything)


def test_reading_records_are_read_as_question_scene_answer() -> None:
    """The base reads each reading task as plain prose: the question, the scene in words, the answer."""
    records = reading_records(seed=0, count=8)
    assert [r.id for r in records] == [f"demo-reading:{i}" for i in range(8)]
    for record, task in zip(records, reading_tasks(0, 8), strict=True):
        assert record.kind == "instruction" and record.input == task["input"]
        assert plain_text(record) == f"{task['instruction']}\n{task['input']}\n{task['output']}"


def test_the_base_reads_the_configured_reading_texts_beside_the_demo_text(
    tiny_project: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_project, tmp_path, "training.demo_base.reading_texts=8",
                      "training.demo_base.steps=2", f"model.base.path={tmp_path / 'base'}")
    result = train_demo_base(cfg)
    assert result.n_texts == len(demo_records(cfg, split="train")) + 8
