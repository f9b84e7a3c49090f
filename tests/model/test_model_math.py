"""The method's arithmetic, pinned by values computed here with a few lines of plain torch.

Each test restates one formula of docs/METHOD.md independently of the code under test: the
gated prompt attention with its 1/sqrt(d) scale and tanh gate (§2), bias and scale in their two
positions and LoRA (§1), the identity at initialisation (§1), early and additive fusion and rows
without an image (§3), the visual bridge (§3) and folding (§7). A change to any of those
mechanisms changes a number here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_LLAMA, image_batch, tiny_config, token_batch
from torch import nn
from torch.nn import functional
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.attention import PromptedLlamaAttention
from llama_adapter_v2.model.build import build_base, build_model
from llama_adapter_v2.model.vision import CLIP_MEAN, CLIP_STD, BridgeBlock, ClipImageTransform

HEADS, KV_HEADS = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"]
HEAD_DIM = TINY_LLAMA["hidden_size"] // HEADS


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, n_heads * d) -> (B, n_heads, T, d)."""
    return x.view(*x.shape[:2], n_heads, HEAD_DIM).transpose(1, 2)


# --------------------------------------------------------------------------- §2 gated prompt attention


def _prompt_term_by_hand(attention: PromptedLlamaAttention, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """o_proj's weight times tanh(g_h) * softmax(q Kp^T / sqrt(d)) Vp, concatenated over heads."""
    q = _heads(x @ attention.q_proj.frozen.weight.T, HEADS)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)  # the text query carries RoPE; the prompt keys do not
    keys = _heads((prompt @ attention.k_proj.frozen.weight.T).unsqueeze(0), KV_HEADS)
    values = _heads((prompt @ attention.v_proj.frozen.weight.T).unsqueeze(0), KV_HEADS)
    keys = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)  # GQA: each kv head serves its query group
    values = values.repeat_interleave(HEADS // KV_HEADS, dim=1)
    probabilities = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
    gate = torch.tanh(attention.gate).view(1, -1, 1, 1).expand(1, HEADS, 1, 1)
    per_head = gate * (probabilities @ values)  # (B, heads, T, d)
    concatenated = per_head.transpose(1, 2).reshape(*x.shape[:2], HEADS * HEAD_DIM)
    return concatenated @ attention.o_proj.frozen.weight.T


@pytest.mark.parametrize("gate_kind", ["head", "scalar"])
def test_prompted_attention_adds_the_scaled_and_tanh_gated_prompt_term(gate_kind: str) -> None:
    model = build_model(tiny_config({"gate": gate_kind})).eval()
    attention = model.base.model.layers[3].self_attn
    assert isinstance(attention, PromptedLlamaAttention) and attention.source == "adaptation"
    with torch.no_grad():
        attention.gate.copy_(torch.linspace(-1.5, 2.0, attention.gate.numel()))  # tanh far from identity
        x = torch.randn(2, 5, TINY_LLAMA["hidden_size"], generator=_generator(3))
        positions = torch.arange(5).unsqueeze(0)
        cos, sin = model.base.model.rotary_emb(x, positions)
        prompt = attention.prompt
        assert prompt is not None
        prompts = {3: attention.prompt_kv(prompt.unsqueeze(0))}
        with_prompts, _ = attention(x, (cos, sin), adapter_prompts=prompts)
        text_only, _ = attention(x, (cos, sin), adapter_prompts=None)
        expected = _prompt_term_by_hand(attention, x, cos, sin, prompt)
    assert (expected.abs().max()) > 1e-2  # the term is there to be measured
    assert torch.allclose(with_prompts - text_only, expected, atol=2e-6, rtol=1e-4)


def test_a_zero_gate_adds_exactly_nothing() -> None:
    model = build_model(tiny_config()).eval()
    attention = model.base.model.layers[3].self_attn
    assert isinstance(attention, PromptedLlamaAttention) and attention.prompt is not None
    x = torch.randn(2, 5, TINY_LLAMA["hidden_size"], generator=_generator(4))
    with torch.no_grad():
        cos, sin = model.base.model.rotary_emb(x, torch.arange(5).unsqueeze(0))
        prompts = {3: attention.prompt_kv(attention.prompt.unsqueeze(0))}
        assert torch.equal(attention(x, (cos, sin), adapter_prompts=prompts)[0],
                           attention(x, (cos, sin), adapter_prompts=None)[0])


# --------------------------------------------------------------------------- §1 identity at the start


@pytest.mark.parametrize("adapter", [{"lora_rank": 2}, {"scale_position": "input", "gate": "scalar"}])
def test_every_piece_starts_at_its_identity_value(adapter: dict[str, Any]) -> None:
    model = build_model(tiny_config(adapter))
    linears = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(linears) == 7 * TINY_LLAMA["num_hidden_layers"]
    for linear in linears:
        assert linear.bias is not None and torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert linear.scale is not None and torch.equal(linear.scale, torch.ones_like(linear.scale))
        if linear.lora_b is not None:
            assert torch.equal(linear.lora_b, torch.zeros_like(linear.lora_b))
    gates = [a.gate for a in model.prompted_attentions()]
    assert len(gates) == 3 and all(torch.equal(g, torch.zeros_like(g)) for g in gates)


# --------------------------------------------------------------------------- §1 bias, scale, LoRA


def _frozen(seed: int) -> nn.Linear:
    linear = nn.Linear(6, 4, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 6, generator=_generator(seed)))
        linear.bias.copy_(torch.randn(4, generator=_generator(seed + 1)))
    return linear.requires_grad_(False)


def _moved(linear: AdaptedLinear, seed: int) -> AdaptedLinear:
    with torch.no_grad():
        for parameter in linear.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=_generator(seed)) * 0.5 + 1.0)
    return linear


def test_output_scale_multiplies_the_whole_affine_output() -> None:
    frozen = _frozen(10)
    adapted = _moved(AdaptedLinear(frozen, bias=True, scale_position="output"), 11)
    x = torch.randn(3, 6, generator=_generator(12))
    assert adapted.scale is not None and adapted.bias is not None and adapted.scale.shape == (4,)
    expected = adapted.scale * (x @ frozen.weight.T + frozen.bias + adapted.bias)
    assert torch.allclose(adapted(x), expected, atol=1e-6, rtol=0)


def test_input_scale_multiplies_the_input_and_the_bias_stays_outside() -> None:
    frozen = _frozen(20)
    adapted = _moved(AdaptedLinear(frozen, bias=True, scale_position="input"), 21)
    x = torch.randn(3, 6, generator=_generator(22))
    assert adapted.scale is not None and adapted.bias is not None and adapted.scale.shape == (6,)
    expected = (adapted.scale * x) @ frozen.weight.T + frozen.bias + adapted.bias
    assert torch.allclose(adapted(x), expected, atol=1e-6, rtol=0)


def test_lora_adds_alpha_over_rank_times_b_a_x() -> None:
    frozen = _frozen(30)
    adapted = _moved(AdaptedLinear(frozen, bias=False, scale_position="output", lora_rank=2, lora_alpha=6.0),
                     31)
    x = torch.randn(3, 6, generator=_generator(32))
    assert adapted.scale is None and adapted.lora_a is not None and adapted.lora_b is not None
    expected = x @ frozen.weight.T + frozen.bias + (6.0 / 2) * (x @ adapted.lora_a.T @ adapted.lora_b.T)
    assert torch.allclose(adapted(x), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- §7 folding


@pytest.mark.parametrize("position", ["output", "input"])
def test_folding_computes_the_weights_of_docs_method_section_7(position: str) -> None:
    frozen = _frozen(40)
    adapted = _moved(AdaptedLinear(frozen, bias=True, scale_position=position, lora_rank=2, lora_alpha=4.0),
                     41)
    assert adapted.scale is not None and adapted.bias is not None
    assert adapted.lora_a is not None and adapted.lora_b is not None
    merged = frozen.weight + (4.0 / 2) * adapted.lora_b @ adapted.lora_a
    if position == "output":  # W' = diag(s) W, b' = s * b
        weight, bias = adapted.scale[:, None] * merged, adapted.scale * (frozen.bias + adapted.bias)
    else:  # W' = W diag(s), b' = b
        weight, bias = merged * adapted.scale[None, :], frozen.bias + adapted.bias
    folded = adapted.folded()
    assert torch.allclose(folded.weight, weight, atol=1e-6, rtol=0)
    assert torch.allclose(folded.bias, bias, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- §3 early and additive fusion


def _keys_by_hand(attention: PromptedLlamaAttention, tokens: torch.Tensor) -> torch.Tensor:
    return _heads(tokens @ attention.k_proj.frozen.weight.T, KV_HEADS)


def _values_by_hand(attention: PromptedLlamaAttention, tokens: torch.Tensor) -> torch.Tensor:
    return _heads(tokens @ attention.v_proj.frozen.weight.T, KV_HEADS)


def _visual(model: LlamaAdapterV2, images: torch.Tensor) -> torch.Tensor:
    assert model.visual_bridge is not None and model.clip is not None
    return model.visual_bridge(model.clip(images))


def test_early_fusion_feeds_visual_tokens_to_the_first_layers_and_own_prompts_to_the_last() -> None:
    model = build_model(tiny_config()).eval()
    images = image_batch()
    with torch.no_grad():
        states = model.prompt_states(images, batch=2)
        visual = _visual(model, images)
        assert sorted(states) == [0, 2, 3]
        first = model.base.model.layers[0].self_attn
        assert torch.allclose(states[0].keys, _keys_by_hand(first, visual), atol=1e-6, rtol=0)
        assert torch.allclose(states[0].values, _values_by_hand(first, visual), atol=1e-6, rtol=0)
        for index in (2, 3):
            late = model.base.model.layers[index].self_attn
            own = late.prompt.unsqueeze(0)
            assert torch.allclose(states[index].keys, _keys_by_hand(late, own), atol=1e-6, rtol=0)
        assert sorted(model.prompt_states(None, batch=2)) == [2, 3]  # text only: no visual layer


def test_additive_fusion_adds_the_visual_tokens_to_every_adaptation_prompt() -> None:
    model = build_model(tiny_config({"visual_fusion": "additive"})).eval()
    images = image_batch()
    with torch.no_grad():
        states = model.prompt_states(images, batch=2)
        visual = _visual(model, images)
        assert sorted(states) == [2, 3]
        for index in (2, 3):
            attention = model.base.model.layers[index].self_attn
            tokens = attention.prompt.unsqueeze(0) + visual
            assert torch.allclose(states[index].keys, _keys_by_hand(attention, tokens), atol=1e-5, rtol=0)
            assert torch.allclose(states[index].values, _values_by_hand(attention, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", ["early", "additive"])
def test_a_row_without_an_image_gets_the_values_of_no_visual_tokens(fusion: str) -> None:
    model = build_model(tiny_config({"visual_fusion": fusion})).eval()
    with torch.no_grad():
        states = model.prompt_states(image_batch(), batch=2, image_mask=torch.tensor([True, False]))
        for index, state in states.items():
            attention = model.base.model.layers[index].self_attn
            if attention.source == "visual":  # early: the visual layer's row 1 adds nothing
                assert torch.equal(state.values[1], torch.zeros_like(state.values[1]))
            else:  # row 1 sees the adaptation prompt alone (early fusion shares one batch row)
                alone = _values_by_hand(attention, attention.prompt.unsqueeze(0))[0]
                row = state.values.expand(2, -1, -1, -1)[1]
                assert torch.allclose(row, alone, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- §3 the visual bridge


def test_bridge_block_is_a_pre_norm_transformer_block() -> None:
    torch.manual_seed(0)
    block = BridgeBlock(width=8, n_heads=2, mlp_ratio=2.0)
    x = torch.randn(2, 5, 8, generator=_generator(50))
    with torch.no_grad():
        q, k, v = functional.linear(block.norm1(x), block.qkv.weight, block.qkv.bias).chunk(3, dim=-1)
        q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in (q, k, v))
        attended = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v
        h = x + block.proj(attended.transpose(1, 2).reshape(2, 5, 8))
        expected = h + block.fc2(functional.gelu(block.fc1(block.norm2(h))))
        assert torch.allclose(block(x), expected, atol=1e-6, rtol=0)


def test_visual_bridge_returns_the_projected_query_outputs() -> None:
    model = build_model(tiny_config()).eval()
    bridge = model.visual_bridge
    assert bridge is not None
    clip_tokens = torch.randn(2, 17, 48, generator=_generator(60))
    with torch.no_grad():
        tokens = bridge.clip_proj_norm(bridge.clip_proj(clip_tokens))
        x = torch.cat([bridge.visual_query.expand(2, -1, -1), tokens], dim=1)
        for block in bridge.blocks:
            x = block(x)
        expected = bridge.visual_proj_norm(bridge.visual_proj(x[:, :3]))
        assert torch.equal(bridge(clip_tokens), expected)
    assert expected.shape == (2, 3, TINY_LLAMA["hidden_size"])


def test_output_gain_scales_the_visual_prompts_exactly() -> None:
    """``visual.output_gain`` is the output LayerNorm's initial weight: with its bias at zero the
    prompts are exactly that many times the gain-1 prompts (a power of two multiplies exactly)."""
    clip_tokens = torch.randn(2, 17, 48, generator=_generator(61))
    prompts = {}
    for gain in (1.0, 4.0):
        torch.manual_seed(0)
        bridge = build_model(tiny_config({"visual": {"output_gain": gain}})).eval().visual_bridge
        assert bridge is not None
        weight = bridge.visual_proj_norm.weight
        assert torch.equal(weight, torch.full_like(weight, gain))
        with torch.no_grad():
            prompts[gain] = bridge(clip_tokens)
    assert torch.equal(prompts[4.0], 4 * prompts[1.0])


def test_the_visual_path_reaches_the_logits_only_through_a_moved_gate() -> None:
    model = build_model(tiny_config()).eval()
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens, images=image_batch(seed=0)).logits,
                           model(tokens, images=image_batch(seed=1)).logits)
        model.base.model.layers[0].self_attn.gate.fill_(1.0)
        moved = (model(tokens, images=image_batch(seed=0)).logits
                 - model(tokens, images=image_batch(seed=1)).logits)
    assert moved.abs().max() > 1e-4


# --------------------------------------------------------------------------- where the pieces go


def test_lora_goes_on_its_targets_with_alpha_over_rank_and_bias_and_scale_on_theirs() -> None:
    adapter = {"lora_rank": 2, "lora_alpha": 6.0, "lora_targets": ["q_proj", "down_proj"],
               "bias_targets": ["o_proj", "down_proj"]}
    model = build_model(tiny_config(adapter))
    layer = model.base.model.layers[1]
    owners = {"q_proj": layer.self_attn, "k_proj": layer.self_attn, "o_proj": layer.self_attn,
              "down_proj": layer.mlp, "up_proj": layer.mlp}
    for name, owner in owners.items():
        linear = getattr(owner, name)
        if name in ("k_proj", "up_proj"):  # in neither list: the plain frozen layer
            assert type(linear) is nn.Linear
            continue
        assert isinstance(linear, AdaptedLinear)
        assert (linear.lora_a is not None) == (name in adapter["lora_targets"]), name
        assert (linear.bias is not None) == (name in adapter["bias_targets"]), name
        if linear.lora_a is not None:
            assert linear.lora_scaling == 6.0 / 2
            assert linear.lora_a.shape == (2, linear.in_features)
    declared = {name.rsplit(".", 1)[-1] for name, _ in model.adapter_named_parameters()
                if ".layers.1.self_attn.q_proj." in name}
    assert declared == {"lora_a", "lora_b"}  # a LoRA-only linear declares no bias or scale


def test_a_bf16_base_gets_its_adapter_beside_it_in_bf16() -> None:
    model = build_model(tiny_config({"lora_rank": 2}), dtype=torch.bfloat16)
    assert {p.dtype for _, p in model.adapter_named_parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- the text path around it


def test_the_attention_mask_reaches_the_base_as_transformers_applies_it() -> None:
    """At the start the model is the frozen base: with left padding and its mask, bit for bit."""
    cfg = tiny_config()
    model = build_model(cfg).eval()
    base = build_base(cfg.model.base, device=torch.device("cpu"), dtype=torch.float32)
    tokens = token_batch()
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = base(tokens, attention_mask=mask).logits
        assert not torch.equal(expected, base(tokens).logits)  # the mask matters for this batch
        assert torch.equal(model(tokens, attention_mask=mask).logits, expected)


def test_the_loss_of_one_supervised_token_is_its_cross_entropy() -> None:
    model = build_model(tiny_config()).eval()
    tokens = token_batch(batch=1)
    labels = torch.full_like(tokens, -100)
    labels[0, 5] = tokens[0, 5]
    with torch.no_grad():
        logits = model(tokens).logits
        loss = model(tokens, labels=labels).loss
    expected = -torch.log_softmax(logits[0, 4], dim=-1)[tokens[0, 5]]  # position 4 predicts token 5
    assert loss is not None and torch.allclose(loss, expected, atol=1e-5, rtol=0)


def test_prompts_shared_or_per_sample_meet_every_row_of_a_larger_batch() -> None:
    """A prompt of batch 1 serves every row; a per-sample prompt of batch 3 serves rows 0, 0, 0, 1, ...
    of a batch of 9 (beam search and several samples per prompt repeat each input in place)."""
    model = build_model(tiny_config()).eval()
    attention = model.base.model.layers[3].self_attn
    assert isinstance(attention, PromptedLlamaAttention) and attention.prompt is not None
    with torch.no_grad():
        attention.gate.fill_(1.0)
        x = torch.randn(9, 5, TINY_LLAMA["hidden_size"], generator=_generator(70))
        cos, sin = model.base.model.rotary_emb(x, torch.arange(5).unsqueeze(0))
        per_sample = attention.prompt.unsqueeze(0) + torch.randn(3, 1, TINY_LLAMA["hidden_size"],
                                                                 generator=_generator(71))
        one = {3: attention.prompt_kv(attention.prompt[None])}
        shared, _ = attention(x[:3], (cos, sin), adapter_prompts=one)
        repeated, _ = attention(x, (cos, sin), adapter_prompts={3: attention.prompt_kv(per_sample)})
        text_only, _ = attention(x, (cos, sin), adapter_prompts=None)
        for row in range(3):
            expected = _prompt_term_by_hand(attention, x[row:row + 1], cos, sin, attention.prompt)
            assert torch.allclose(shared[row] - text_only[row], expected[0], atol=2e-6, rtol=1e-4)
        for row in range(9):
            expected = _prompt_term_by_hand(attention, x[row:row + 1], cos, sin, per_sample[row // 3])
            assert torch.allclose(repeated[row] - text_only[row], expected[0], atol=2e-6, rtol=1e-4)


def test_lora_a_starts_as_nn_linear_initialises_a_weight_and_b_at_zero() -> None:
    """Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in), as PEFT's LoRA and nn.Linear."""
    torch.manual_seed(0)
    frozen = nn.Linear(64, 8, bias=False)
    adapted = AdaptedLinear(frozen, bias=False, scale_position="none", lora_rank=4)
    assert adapted.lora_a is not None and adapted.lora_b is not None
    bound = 1 / math.sqrt(64)
    largest = float(adapted.lora_a.abs().max())
    assert 0.95 * bound < largest <= bound  # 256 draws: the largest lies within 5 % of the bound
    assert torch.equal(adapted.lora_b, torch.zeros(8, 4))


def test_images_for_another_batch_size_are_refused() -> None:
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="3 images for a batch of 2 token sequences"):
        model(token_batch(batch=2), images=image_batch(batch=3))


def test_image_transform_resizes_the_shorter_side_then_crops_the_centre() -> None:
    """A 30x20 grey ramp at 10 px: bicubic to 15x10, the 10 columns from x = 2, CLIP's mean and std."""
    ramp = Image.fromarray(np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1)), mode="L")
    rgb = np.asarray(ramp.convert("RGB").resize((15, 10), Image.Resampling.BICUBIC).crop((2, 0, 12, 10)))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1) - mean) / std
    assert torch.allclose(ClipImageTransform(10)(ramp), expected, atol=1e-6, rtol=0)
    tall = ramp.transpose(Image.Transpose.TRANSPOSE)  # 20x30: the crop moves down instead
    rgb = np.asarray(tall.convert("RGB").resize((10, 15), Image.Resampling.BICUBIC).crop((0, 2, 10, 12)))
    expected = (torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1) - mean) / std
    assert torch.allclose(ClipImageTransform(10)(tall), expected, atol=1e-6, rtol=0)
