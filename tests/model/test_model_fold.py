"""Folding bias, scale and LoRA into the base: same outputs, stock transformers loads the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import image_batch, move_gates, perturb_adapter, tiny_config, token_batch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.config import Config
from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.build import build_base, build_model
from llama_adapter_v2.model.checkpoint import load_adapter, save_adapter, saved_model_config
from llama_adapter_v2.model.fold import FOLDED_BASE_DIR, export_folded, fold_adapter

NO_PROMPTS: dict[str, Any] = {"prompt_len": 0, "visual_layers": 0}


def _trained(cfg: Config) -> LlamaAdapterV2:
    model = build_model(cfg).eval()
    perturb_adapter(model)
    move_gates(model)
    return model


def _max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).abs().max())


@pytest.mark.parametrize(
    "adapter",
    [
        {"scale_position": "output", "lora_rank": 2},
        {"scale_position": "input", "lora_rank": 2, "visual_fusion": "additive"},
        {"scale_position": "none", "bias_targets": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    ],
    ids=["output-lora", "input-additive", "mm-biases"],
)
def test_folded_equals_unfolded(adapter: dict[str, Any]) -> None:
    model = _trained(tiny_config(adapter))
    tokens, images = token_batch(), image_batch()
    with torch.no_grad():
        before = model(tokens, images=images).logits
        fold_adapter(model)
        after = model(tokens, images=images).logits
        frozen_base = model.base(tokens).logits
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert model.base.config.attention_bias and model.base.config.mlp_bias
    assert _max_difference(before, after) < 1e-5
    assert _max_difference(before, frozen_base) > 1e-3  # prompts are still at work


def _saved_with_base_folder(tmp_path: Path, adapter: dict[str, Any]) -> tuple[LlamaAdapterV2, Path]:
    cfg = tiny_config(adapter)
    build_base(cfg.model.base, device=torch.device("cpu"), dtype=torch.float32).save_pretrained(
        tmp_path / "base"
    )
    model = _trained(tiny_config(adapter, base={"path": str(tmp_path / "base")}))
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_lav2_fold_without_prompts_gives_a_stock_transformers_folder(tmp_path: Path) -> None:
    model, adapter_dir = _saved_with_base_folder(
        tmp_path, {**NO_PROMPTS, "scale_position": "input", "lora_rank": 2}
    )
    out = tmp_path / "folded"
    result = CliRunner().invoke(app, ["fold", "--adapter", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "stock transformers Llama" in result.output
    stock = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(stock) is LlamaForCausalLM and stock.config.attention_bias and stock.config.mlp_bias
    tokens = token_batch()
    with torch.no_grad():
        assert _max_difference(model(tokens).logits, stock(tokens).logits) < 1e-5


def test_lav2_fold_with_prompts_keeps_prompts_over_a_folded_base(tmp_path: Path) -> None:
    model, adapter_dir = _saved_with_base_folder(tmp_path, {"lora_rank": 2})
    out = tmp_path / "folded"
    result = CliRunner().invoke(app, ["fold", "--adapter", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stock = LlamaForCausalLM.from_pretrained(out / "base", local_files_only=True)
    assert stock.config.attention_bias
    folded_config = saved_model_config(out)
    assert folded_config.adapter.bias_targets == [] and folded_config.adapter.lora_rank == 0
    reloaded = load_adapter(build_model(Config(name="folded", model=folded_config)), out).eval()
    assert not any(isinstance(m, AdaptedLinear) for m in reloaded.modules())
    tokens, images = token_batch(), image_batch()
    with torch.no_grad():
        assert (
            _max_difference(model(tokens, images=images).logits, reloaded(tokens, images=images).logits)
            < 1e-5
        )


def _stock_keys(folder: Path) -> set[str]:
    """The weights a stock transformers Llama of this folder's config expects."""
    config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        return set(LlamaForCausalLM(config).state_dict())


def test_export_writes_exactly_the_stock_weights_and_the_tokenizer_beside_them(tmp_path: Path) -> None:
    model = _trained(tiny_config({"lora_rank": 2}))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"made": "here"}')
    base_dir = export_folded(model, tmp_path / "out", tokenizer_from=tmp_path / "tokenizer")
    assert base_dir == tmp_path / "out" / FOLDED_BASE_DIR
    assert set(load_file(str(base_dir / "model.safetensors"))) == _stock_keys(base_dir)
    assert (base_dir / "tokenizer.json").read_text() == '{"made": "here"}'
    recorded = saved_model_config(tmp_path / "out").base  # the folded base, by path only
    assert recorded.path == base_dir and recorded.arch is None


@pytest.mark.parametrize(
    "adapter", [{"visual_layers": 0}, {"prompt_len": 0}], ids=["prompts-only", "visual-only"]
)
def test_prompts_or_a_visual_path_alone_keep_the_export_an_adapter_folder(
    tmp_path: Path, adapter: dict[str, Any]
) -> None:
    model = _trained(tiny_config(adapter))
    assert export_folded(model, tmp_path / "out") == tmp_path / "out" / FOLDED_BASE_DIR
    assert (tmp_path / "out" / "adapter.json").is_file()


def test_folding_gives_every_decoder_linear_a_bias_zero_where_the_adapter_had_none() -> None:
    only_q_and_o = {"bias_targets": ["q_proj", "o_proj"], "scale_position": "none"}
    model = _trained(tiny_config(NO_PROMPTS | only_q_and_o))
    fold_adapter(model)
    for layer in model.base.model.layers:
        for linear in (layer.self_attn.k_proj, layer.mlp.up_proj):
            assert type(linear) is torch.nn.Linear and linear.bias is not None
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias)) and not linear.bias.requires_grad
        assert layer.self_attn.q_proj.bias.abs().max() > 0  # the trained bias, folded
