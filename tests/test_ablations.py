"""Ablation variants apply to the demo config; early losses and the table are computed as stated."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_adapter_v2.config import load_config
from llama_adapter_v2.evaluate.ablations import (
    Spread,
    ablation_chart,
    ablation_table,
    early_losses,
    initial_losses,
    read_variants,
    spread_over_seeds,
)


def test_shipped_variants_validate_on_the_demo_config(repo_root: Path) -> None:
    variants = read_variants(repo_root / "configs" / "ablations" / "variants.yaml")
    assert [v.name for v in variants] == ["paper", "all-params-mixed", "additive-fusion", "random-gates",
                                          "no-multimodal-instructions"]
    configs = {v.name: load_config(repo_root / "configs" / "demo.yaml", v.overrides) for v in variants}
    assert configs["paper"].training.trainable == "disjoint"
    assert configs["all-params-mixed"].training.trainable == "all"
    assert configs["additive-fusion"].model.adapter.visual_fusion == "additive"
    assert configs["random-gates"].model.adapter.gate_init == "random"
    assert configs["no-multimodal-instructions"].training.multimodal_instructions is False
    assert configs["paper"].training.multimodal_instructions is True


def test_bad_variant_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "variants.yaml"
    path.write_text("x: {overrides: [training.steps]}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="key=value"):
        read_variants(path)
    path.write_text("x: {description: no overrides list}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a list `overrides`"):
        read_variants(path)


def test_early_losses_spread_and_table(tmp_path: Path) -> None:
    losses = [(1, "caption", 4.0), (2, "instruction", 3.0), (3, "caption", 2.0), (4, "caption", 1.0)]
    assert early_losses(losses, first_steps=3) == {"early_loss_caption": 3.0, "early_loss_instruction": 3.0}
    final = {"holdout/caption": 0.5, "holdout_initial/caption": 2.0, "holdout_initial/instruction": 3.0}
    assert initial_losses(final) == {"initial_loss_caption": 2.0, "initial_loss_instruction": 3.0}
    runs = [{"caption_cider": 1.0, "grounded_accuracy": 0.5},
            {"caption_cider": 2.0, "grounded_accuracy": 0.7},
            {"caption_cider": 3.0}]
    spread = spread_over_seeds(runs)
    assert set(spread) == {"caption_cider"}  # a metric not every seed has is left out, not averaged
    assert spread["caption_cider"] == Spread(mean=2.0, std=1.0, runs=3)  # sample standard deviation
    rows = {"zero-init": {"caption_cider": Spread(0.01, 0.0, 1)}, "paper": spread}
    lines = ablation_table(rows).splitlines()
    assert lines[0].startswith("| variant | seeds | grounded acc. |")
    assert "| zero-init | 1 |" in lines[2] and "0.010 |" in lines[2]
    assert "| paper | 3 |" in lines[3] and "2.000 ± 1.000" in lines[3]
    chart = ablation_chart(rows, tmp_path / "chart.png", "t")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
