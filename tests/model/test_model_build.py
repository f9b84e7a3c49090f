"""Building from configs and folders, parameter counts of the real configs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import TINY_CLIP, TINY_LLAMA, image_batch, tiny_config, token_batch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.config import Config
from llama_adapter_v2.config.layer_plan import plan_layers
from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.build import BaseModelError, build_model, load_tokenizer
from llama_adapter_v2.model.vision import CLIP_MEAN, CLIP_STD

REPO = Path(__file__).resolve().parents[2]
LAYERS, WIDTH = 32, 4096
BRIDGE = 768


def bridge_block(width: int) -> int:
    """Two LayerNorms, qkv and output projection with biases, a 4x GELU MLP with biases."""
    norms, attention = 4 * width, (3 * width * width + 3 * width) + (width * width + width)
    return norms + attention + (width * 4 * width + 4 * width) + (4 * width * width + width)


# clip_proj (768 -> 768, LayerNorm), 10 queries, 8 blocks, visual_proj (768 -> 4096, LayerNorm)
VISUAL_PATH = (
    (768 * BRIDGE + 3 * BRIDGE) + 10 * BRIDGE + 8 * bridge_block(BRIDGE) + (BRIDGE * WIDTH + 3 * WIDTH)
)


def _params(config: str, *overrides: str) -> dict[str, object]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["params", str(REPO / "configs" / config), "--json", *sets])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_llama2_7b_counts_match_method_section_6() -> None:
    counts = _params("llama2-7b.yaml")
    kinds, groups = counts["by_kind"], counts["by_group_and_kind"]
    assert kinds["bias"] + kinds["scale"] + kinds["norm"] == 2_985_984
    assert kinds["prompt"] == 10 * 30 * WIDTH
    assert groups["language"]["gate"] == 30 * 32 and groups["visual"]["gate"] == 32
    assert kinds["visual"] == VISUAL_PATH == 60_460_800
    assert counts["by_group"] == {
        "visual": VISUAL_PATH + 32,
        "language": 2_985_984 + 10 * 30 * WIDTH + 30 * 32,
    }
    assert counts["base"] == 6_738_415_616


def test_method_table_rows_from_config_overrides() -> None:
    paper = _params("llama2-7b.yaml", "model.adapter.prompt_layers=31", "model.adapter.visual_layers=0")
    assert paper["trainable"] == 4_256_736
    mm_instruction = _params(
        "llama2-7b.yaml",
        "model.adapter.bias_targets=[q_proj, o_proj, gate_proj, up_proj, down_proj]",
        "model.adapter.scale_position=none",
        "model.adapter.prompt_len=0",
        "model.adapter.visual_layers=0",
    )
    assert mm_instruction["trainable"] == 1_363_968
    c65 = _params(
        "llama2-7b.yaml",
        "model.base.arch.hidden_size=8192",
        "model.base.arch.intermediate_size=22016",
        "model.base.arch.num_hidden_layers=80",
        "model.base.arch.num_attention_heads=64",
        "model.base.arch.num_key_value_heads=64",
        "model.adapter.scale_position=input",
        "model.adapter.prompt_len=0",
        "model.adapter.visual_layers=0",
    )
    assert c65["trainable"] == 13_811_712


def test_llama3_8b_counts_follow_grouped_query_attention() -> None:
    counts = _params("llama3-8b.yaml")
    kv_width, ffn = 8 * 128, 14336
    per_layer_outputs = 2 * WIDTH + 2 * kv_width + 2 * ffn + WIDTH
    assert counts["by_kind"]["bias"] == counts["by_kind"]["scale"] == LAYERS * per_layer_outputs
    assert counts["by_kind"]["norm"] == (2 * LAYERS + 1) * WIDTH
    assert counts["by_kind"]["visual"] == VISUAL_PATH
    assert counts["base"] == 8_030_261_248


def test_params_table_prints_both_groups() -> None:
    result = CliRunner().invoke(app, ["params", str(REPO / "configs" / "demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "visual" in result.output and "language" in result.output and "% of it" in result.output


def test_a_non_llama_base_fails_clearly(tmp_path: Path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    cfg = tiny_config()
    cfg.model.base.path = tmp_path / "gpt2"
    with pytest.raises(BaseModelError, match="'gpt2' model; LLaMA-Adapter V2 wraps Llama-family"):
        build_model(cfg)
    with pytest.raises(TypeError, match="wraps a transformers LlamaForCausalLM; got GPT2LMHeadModel"):
        LlamaAdapterV2(gpt2, cfg.model.adapter, plan_layers(cfg.model.adapter, 4))  # type: ignore[arg-type]


def test_a_missing_base_folder_fails_off_the_meta_device(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.model.base.path = tmp_path / "absent"
    with pytest.raises(BaseModelError, match="not found"):
        build_model(cfg)
    assert build_model(cfg, device="meta").base.lm_head.weight.is_meta


def test_arch_only_bases_are_the_same_on_every_build() -> None:
    """Frozen weights come from a fixed seed; the adapter's own initial values use the caller's RNG."""
    first, second = build_model(tiny_config()), build_model(tiny_config())
    adapter = {name for name, _ in first.adapter_named_parameters()}
    frozen = [(n, p) for n, p in first.named_parameters() if n not in adapter]
    others = dict(second.named_parameters())
    assert len(frozen) > 40
    for name, parameter in frozen:
        assert torch.equal(parameter, others[name]), name


def test_clip_folder_without_projection_uses_its_hidden_tokens(tmp_path: Path) -> None:
    tower_arch = {k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}
    CLIPVisionModel(CLIPVisionConfig(**tower_arch)).save_pretrained(tmp_path / "clip")
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["vision"] = {"path": str(tmp_path / "clip")}
    model = build_model(Config.model_validate(raw)).eval()
    assert model.clip is not None and model.clip.width == TINY_CLIP["hidden_size"]
    with torch.no_grad():
        assert model(token_batch(), images=image_batch()).logits.shape == (2, 9, TINY_LLAMA["vocab_size"])


def test_image_transform_resizes_crops_and_normalises() -> None:
    transform = build_model(tiny_config()).image_transform
    assert transform is not None
    colour = (200, 100, 50)
    tensor = transform(Image.new("RGB", (50, 40), colour))
    assert tensor.shape == (3, 32, 32)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(tensor.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert transform(Image.new("L", (32, 32), 128)).shape == (3, 32, 32)


def test_load_tokenizer_reads_the_base_folder(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(tmp_path)
    cfg = tiny_config()
    cfg.model.base.path = tmp_path
    assert load_tokenizer(cfg)("hello world")["input_ids"] == [3, 4]


def test_full_clip_folder_gives_the_vision_tower_and_its_projection(tmp_path: Path) -> None:
    """A whole CLIPModel folder (as openai/clip-vit-large-patch14 ships): vision side only."""
    tower_arch = {k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    full = CLIPModel(CLIPConfig(vision_config=tower_arch, text_config=text, projection_dim=48)).eval()
    full.save_pretrained(tmp_path / "clip")
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["vision"] = {"path": str(tmp_path / "clip")}
    model = build_model(Config.model_validate(raw))
    assert model.clip is not None and model.clip.width == 48
    images = image_batch()
    with torch.no_grad():
        tokens = full.vision_model(pixel_values=images).last_hidden_state
        expected = full.visual_projection(full.vision_model.post_layernorm(tokens))
        assert torch.equal(model.clip(images), expected)


def test_cli_reports_model_errors_without_a_traceback(tmp_path: Path) -> None:
    demo = str(REPO / "configs" / "demo.yaml")
    overrides = ["--set", "model.adapter.visual_fusion=additive", "--set", "model.adapter.prompt_layers=2",
                 "--set", "model.adapter.visual.n_query=5"]
    params = CliRunner().invoke(app, ["params", demo, *overrides])
    assert params.exit_code == 2
    assert "model.adapter.visual.n_query: additive fusion adds the 5 visual tokens" in params.output
    fold = CliRunner().invoke(app, ["fold", "--adapter", str(tmp_path), "--out", str(tmp_path / "out")])
    assert fold.exit_code == 2 and "no adapter metadata" in fold.output
