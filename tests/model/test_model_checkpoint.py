"""Adapter-only checkpoints: exact round trip, clear refusal on another base or config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import image_batch, perturb_adapter, tiny_config, token_batch

from llama_adapter_v2.model.build import build_base, build_model
from llama_adapter_v2.model.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    AdapterMismatchError,
    load_adapter,
    save_adapter,
    saved_model_config,
)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = tiny_config({"lora_rank": 2})
    trained = build_model(cfg).eval()
    perturb_adapter(trained)
    save_adapter(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_FILE, WEIGHTS_FILE]  # no temporary files left
    fresh = build_model(cfg).eval()
    load_adapter(fresh, tmp_path)
    for (name, saved), (other, loaded) in zip(
        trained.adapter_state_dict().items(), fresh.adapter_state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(saved, loaded), name
    tokens, images = token_batch(), image_batch()
    with torch.no_grad():
        assert torch.equal(trained(tokens, images=images).logits, fresh(tokens, images=images).logits)
    with safe_open(tmp_path / WEIGHTS_FILE, framework="pt") as handle:
        assert set(handle.keys()) == set(trained.adapter_state_dict())
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["base"]["hidden_size"] == 64 and len(meta["base"]["config_sha256"]) == 64
    assert saved_model_config(tmp_path) == cfg.model


def test_identity_survives_save_and_reload_of_the_base(tmp_path: Path) -> None:
    """A base written to a folder and read back has the identity of the one built from arch."""
    cfg = tiny_config()
    model = build_model(cfg).eval()
    perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    build_base(cfg.model.base, device=torch.device("cpu"), dtype=torch.float32).save_pretrained(
        tmp_path / "base"
    )
    from_folder = load_adapter(
        build_model(tiny_config(base={"path": str(tmp_path / "base")})), tmp_path / "adapter"
    )
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, from_folder.eval()(tokens).logits)


@pytest.mark.parametrize(
    ("base", "difference"),
    [
        ({"arch": {"hidden_size": 32}}, "hidden_size: adapter has 64, model has 32"),
        ({"arch": {"num_key_value_heads": 4}}, "num_key_value_heads: adapter has 2, model has 4"),
        ({"arch": {"rope_theta": 500000.0}}, "config_sha256"),
    ],
)
def test_loading_onto_another_base_says_what_differs(
    tmp_path: Path, base: dict[str, object], difference: str
) -> None:
    save_adapter(build_model(tiny_config()), tmp_path)
    other = build_model(tiny_config(base=base))
    with pytest.raises(AdapterMismatchError, match="another base model") as error:
        load_adapter(other, tmp_path)
    assert difference in str(error.value)


def test_loading_with_another_adapter_config_says_what_differs(tmp_path: Path) -> None:
    save_adapter(build_model(tiny_config()), tmp_path)
    other = build_model(tiny_config({"gate": "scalar"}))
    with pytest.raises(AdapterMismatchError, match="gate: adapter has 'head', model has 'scalar'"):
        load_adapter(other, tmp_path)


def test_a_folder_without_metadata_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter metadata"):
        load_adapter(build_model(tiny_config()), tmp_path)
