"""Forward pass: exact equality with the frozen base at initialisation, prompts, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import image_batch, move_gates, tiny_config, token_batch
from torch.nn import functional

from llama_adapter_v2.config.layer_plan import AdapterConfigError
from llama_adapter_v2.model.build import build_base, build_model
from llama_adapter_v2.model.vision import ImageShapeError

VARIANTS: list[dict[str, Any]] = [
    {"visual_fusion": fusion, "scale_position": scale, "gate": gate, "lora_rank": lora}
    for fusion in ("early", "additive")
    for scale in ("output", "input", "none")
    for gate, lora in (("head", 0), ("scalar", 4))
]


def _frozen_base_logits(cfg: Any, tokens: torch.Tensor) -> torch.Tensor:
    base = build_base(cfg.model.base, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        return base(tokens).logits


def _variant_id(variant: dict[str, Any]) -> str:
    return "-".join(f"{value}" for value in variant.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_init_logits_equal_frozen_base_exactly(variant: dict[str, Any]) -> None:
    cfg = tiny_config(variant)
    tokens = token_batch()
    expected = _frozen_base_logits(cfg, tokens)
    model = build_model(cfg).eval()
    with torch.no_grad():
        text_only = model(tokens).logits
        with_image = model(tokens, images=image_batch()).logits
    assert torch.equal(text_only, expected)
    assert torch.equal(with_image, expected)


def test_init_equality_with_eager_attention_and_mm_bias_targets() -> None:
    cfg = tiny_config(
        {"bias_targets": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "scale_position": "none"},
        base={"attn_implementation": "eager"},
    )
    tokens = token_batch()
    model = build_model(cfg).eval()
    assert model.base.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(model(tokens, images=image_batch()).logits, _frozen_base_logits(cfg, tokens))


def test_moved_gates_change_logits_and_text_only_skips_visual_layers() -> None:
    cfg = tiny_config()
    tokens, images = token_batch(), image_batch()
    expected = _frozen_base_logits(cfg, tokens)
    model = build_model(cfg).eval()
    visual_gate = model.base.model.layers[0].self_attn.gate
    with torch.no_grad():
        visual_gate.fill_(1.0)
        # early fusion: a text-only batch carries no visual prompts, so layer 0's gate is irrelevant
        assert torch.equal(model(tokens).logits, expected)
        with_image = model(tokens, images=images).logits
        assert (with_image - expected).abs().max() > 1e-3
        move_gates(model)
        assert (model(tokens).logits - expected).abs().max() > 1e-3


def test_additive_fusion_adds_visual_tokens_to_the_prompts() -> None:
    model = build_model(tiny_config({"visual_fusion": "additive"})).eval()
    move_gates(model)
    tokens = token_batch()
    with torch.no_grad():
        text_only = model(tokens).logits
        first = model(tokens, images=image_batch(seed=0)).logits
        second = model(tokens, images=image_batch(seed=1)).logits
    assert not any(a.source == "visual" for a in model.prompted_attentions())
    assert (first - text_only).abs().max() > 1e-4
    assert (first - second).abs().max() > 1e-4


@pytest.mark.parametrize("fusion", ["early", "additive"])
def test_rows_without_an_image_in_a_mixed_batch_get_no_visual_prompts(fusion: str) -> None:
    model = build_model(tiny_config({"visual_fusion": fusion})).eval()
    move_gates(model)
    with torch.no_grad():
        for attention in model.prompted_attentions():
            attention.gate.fill_(1.0)
            attention.v_proj.bias.fill_(0.5)  # a zero image would now leak through v_proj's bias
    tokens, images = token_batch(), image_batch()
    image_mask = torch.zeros(tokens.shape[0], dtype=torch.bool)
    image_mask[0] = True
    with torch.no_grad():
        text_only = model(tokens).logits
        all_images = model(tokens, images=images).logits
        mixed = model(tokens, images=images, image_mask=image_mask).logits
    # additive fusion batches the prompt per row, so rounding may differ in the last bit
    assert torch.allclose(mixed[1:], text_only[1:], atol=1e-6, rtol=0)
    assert (all_images[1:] - text_only[1:]).abs().max() > 1e-4
    assert torch.allclose(mixed[0], all_images[0], atol=1e-6)
    assert (mixed[0] - text_only[0]).abs().max() > 1e-4


def test_eager_and_sdpa_agree() -> None:
    tokens, images = token_batch(), image_batch()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding in the second row
    outputs = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)  # the same prompts and visual path in both models
        model = build_model(tiny_config(base={"attn_implementation": implementation})).eval()
        move_gates(model)
        with torch.no_grad():
            outputs.append(model(tokens, attention_mask=mask, images=images).logits)
    assert torch.allclose(outputs[0][:, 3:], outputs[1][:, 3:], atol=1e-5, rtol=0)
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5, rtol=0)


def test_loss_is_mean_cross_entropy_over_supervised_positions() -> None:
    model = build_model(tiny_config()).eval()
    move_gates(model)
    tokens, images = token_batch(), image_batch()
    labels = tokens.clone()
    labels[:, :5] = -100
    labels[1, 7] = -100
    with torch.no_grad():
        full = model(tokens, images=images).logits
        out = model(tokens, labels=labels, images=images)
    expected = functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1))
    assert out.loss is not None and out.targets is not None
    assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), full.shape[-1])
    assert torch.equal(out.targets, labels[:, 1:][labels[:, 1:] != -100])
    assert torch.allclose(out.loss, expected, atol=1e-6, rtol=0)


def test_prompt_updates_reach_the_next_forward() -> None:
    """Prompt keys/values are recomputed every call: changing a prompt changes the output."""
    model = build_model(tiny_config()).eval()
    move_gates(model)
    tokens = token_batch()
    with torch.no_grad():
        before = model(tokens).logits
        model.base.model.layers[3].self_attn.prompt.add_(0.5)
        after = model(tokens).logits
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 32, 32), "1 channels; the CLIP tower takes 3"),
        ((2, 3, 64, 64), "64x64 pixels"),
        ((3, 32, 32), "got shape"),
    ],
)
def test_wrong_images_fail_clearly(shape: tuple[int, ...], message: str) -> None:
    model = build_model(tiny_config())
    with pytest.raises(ImageShapeError, match=message):
        model(token_batch(), images=torch.zeros(shape))


def test_images_without_a_visual_path_fail_clearly() -> None:
    model = build_model(tiny_config({"visual_layers": 0}))
    assert model.clip is None and model.visual_bridge is None
    with pytest.raises(ValueError, match="no visual path"):
        model(token_batch(), images=image_batch())


def test_too_many_layers_fail_clearly() -> None:
    cfg = tiny_config()
    cfg.model.adapter.prompt_layers = 6  # after validation, as a programmatic edit would
    with pytest.raises(AdapterConfigError, match="6 prompt layers asked, the base model has 4 layers"):
        build_model(cfg)
    cfg.model.adapter.prompt_layers = 4
    with pytest.raises(AdapterConfigError, match="overlap"):
        build_model(cfg)


def test_random_gate_init_ablation_departs_from_the_base_at_once() -> None:
    cfg = tiny_config({"gate_init": "random"})
    tokens = token_batch()
    model = build_model(cfg).eval()
    assert all(bool((a.gate != 0).all()) for a in model.prompted_attentions())
    with torch.no_grad():
        assert (model(tokens).logits - _frozen_base_logits(cfg, tokens)).abs().max() > 1e-4
