"""The atheris fuzz target's check, run on its seeds and on inputs that crashed the old readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzz.readers_fuzz import FORMATS, Workspace, check_one
from llama_adapter_v2.data import validation

SEEDS = Path(__file__).resolve().parents[1] / "fuzz" / "seeds"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def as_input(fmt: str, document: object) -> bytes:
    return bytes([FORMATS.index(fmt)]) + json.dumps(document).encode()


def test_the_seeds_hold_every_property(workspace: Workspace) -> None:
    seeds = sorted(SEEDS.glob("*.bin"))
    assert [seed.stem for seed in seeds] == ["alpaca", "coco", "llava", "self_instruct"]
    for seed in seeds:
        check_one(seed.read_bytes(), workspace)


@pytest.mark.parametrize("data", [
    as_input("coco", {"images": [{"id": [1], "file_name": "0.png"}], "annotations": []}),
    as_input("coco", {"images": [], "annotations": [{"id": 1, "image_id": {"a": 1}, "caption": "x"}]}),
    as_input("llava", [{"conversations": [{"from": ["human"], "value": "x"}]}]),
    bytes([FORMATS.index("alpaca")]) + b"[" * 100_000,
    bytes([FORMATS.index("alpaca")]) + b"[" + b"9" * 5000 + b"]",
    as_input("llava", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                          {"from": "human", "value": None}, {"from": "gpt", "value": "c"}]}]),
], ids=["list-image-id", "object-image_id", "list-from", "deep-nesting", "5000-digits", "null-later-turn"])
def test_inputs_that_crashed_the_old_readers_now_pass(workspace: Workspace, data: bytes) -> None:
    check_one(data, workspace)


def test_the_check_sees_an_image_opened_outside_the_root(workspace: Workspace,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "resolve_inside", lambda root, path: Path(root) / path)  # no root check
    with pytest.raises(AssertionError, match=r"images/link\.png"):  # opened, and it leads outside
        check_one((SEEDS / "coco.bin").read_bytes(), workspace)
