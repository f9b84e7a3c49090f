"""Atomic checkpoints: exact round trip, damaged folders skipped by name, retention, no pickle."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_adapter_v2.train import checkpoint as ckpt
from llama_adapter_v2.train.state import optimizer_state, restore_optimizer, restore_rng, rng_state


def _adapter_writer(value: float):
    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        save_file({"w": torch.full((4, 4), value)}, str(folder / "adapter.safetensors"))
        (folder / "adapter.json").write_text(json.dumps({"value": value}))

    return write


def _write(root: Path, step: int) -> Path:
    return ckpt.write_checkpoint(
        root, step, save_adapter=_adapter_writer(float(step)),
        tensors={"t": torch.arange(step + 3, dtype=torch.float32)},
        state={"step": step, "loss": [0.1 * step]},
    )


def test_round_trip_is_exact_and_manifest_lists_every_file(tmp_path: Path) -> None:
    folder = _write(tmp_path, 7)
    assert folder.name == "step-0000007"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == ["adapter/adapter.json", "adapter/adapter.safetensors",
                                         "state.json", "tensors.safetensors"]
    loaded = ckpt.load_checkpoint(folder)
    assert loaded.step == 7
    assert torch.equal(loaded.tensors["t"], torch.arange(10, dtype=torch.float32))
    assert loaded.state == {"step": 7, "loss": [0.1 * 7]}
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "flipped_byte", "missing_file"])
def test_resume_skips_a_damaged_newest_checkpoint_naming_it(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    target = newest / "adapter" / "adapter.safetensors"
    if damage == "no_manifest":
        (newest / "MANIFEST.json").unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-9])
    elif damage == "flipped_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "state.json").unlink()
    with caplog.at_level(logging.WARNING):
        loaded = ckpt.latest_complete_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 10
    assert str(newest) in caplog.text


def test_keep_last_and_best(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        folder = _write(tmp_path, step)
        if step == 10:
            ckpt.mark_best(tmp_path, folder, 1.25)
    (tmp_path / ".tmp-step-0000025-999").mkdir()  # a crashed write
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [".tmp-step-0000025-999", "step-0000005", "step-0000010"]
    assert [p.name for _, p in ckpt.step_checkpoints(tmp_path)] == ["step-0000020", "step-0000015"]
    assert ckpt.verify_checkpoint(tmp_path / "best") == 10  # the best survives pruning of its step
    assert ckpt.best_metric(tmp_path) == 1.25


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    inputs = torch.randn(16, 6)
    for _ in range(3):
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors, plain = optimizer_state("visual", optimizer)
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(plain))

    twin = torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1.0)
    restore_optimizer("visual", twin_optimizer, load_file(str(tmp_path / "opt.safetensors")),
                      json.loads((tmp_path / "opt.json").read_text()))
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        for _ in range(2):
            net(inputs).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    assert twin_optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    tensors, plain = rng_state()
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    (tmp_path / "rng.json").write_text(json.dumps(plain))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(load_file(str(tmp_path / "rng.safetensors")), json.loads((tmp_path / "rng.json").read_text()))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
