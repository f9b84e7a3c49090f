"""Disjoint groups: one rule, every adapter parameter in exactly one group, gradients stay inside."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_LLAMA, image_batch, move_gates, tiny_config, token_batch

from llama_adapter_v2.model.adapter import LlamaAdapterV2
from llama_adapter_v2.model.build import build_model
from llama_adapter_v2.model.params import count_parameters


def _caption_labels(tokens: torch.Tensor) -> torch.Tensor:
    labels = tokens.clone()
    labels[:, :4] = -100
    return labels


def _frozen_parameters(model: LlamaAdapterV2) -> list[tuple[str, torch.nn.Parameter]]:
    adapter = {id(p) for _, p in model.adapter_named_parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in adapter]


def test_every_adapter_parameter_is_in_exactly_one_group() -> None:
    model = build_model(tiny_config({"lora_rank": 2}))
    groups = model.parameter_groups()
    names = [name for members in groups.values() for name, _ in members]
    assert len(names) == len(set(names)) == len(model.adapter_named_parameters())
    visual = {name for name, _ in groups["visual"]}
    bridge = {n for n in names if n.startswith("visual_bridge.")}
    assert visual == bridge | {"base.model.layers.0.self_attn.gate"}
    language = {name for name, _ in groups["language"]}
    assert {"base.model.layers.3.self_attn.prompt", "base.model.layers.2.self_attn.gate"} <= language
    assert "base.model.norm.weight" in language
    frozen = _frozen_parameters(model)
    assert frozen and not any(p.requires_grad for _, p in frozen)
    frozen_kinds = (".frozen.", "embed_tokens", "lm_head", "clip.tower.")
    assert all(any(kind in name for kind in frozen_kinds) for name, _ in frozen)


def test_additive_fusion_puts_all_gates_in_the_language_group() -> None:
    groups = build_model(tiny_config({"visual_fusion": "additive"})).parameter_groups()
    assert not any(name.endswith(".gate") for name, _ in groups["visual"])
    assert sum(name.endswith(".gate") for name, _ in groups["language"]) == 2


def _backward(model: LlamaAdapterV2, images: torch.Tensor | None) -> None:
    tokens = token_batch()
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=_caption_labels(tokens), images=images).loss
    assert loss is not None
    loss.backward()


@pytest.mark.parametrize("trained", ["visual", "language"])
def test_a_loss_sends_gradient_only_to_its_group(trained: str) -> None:
    model = build_model(tiny_config({"lora_rank": 2})).train()
    move_gates(model)
    with torch.no_grad():  # LoRA B starts at zero; give it a value so A receives gradient too
        for name, parameter in model.adapter_named_parameters():
            if name.endswith("lora_b"):
                parameter.fill_(0.01)
    model.set_trainable([trained])
    _backward(model, image_batch() if trained == "visual" else None)
    for group, members in model.parameter_groups().items():
        for name, parameter in members:
            if group == trained:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            else:
                assert parameter.grad is None, name
    assert all(p.grad is None for _, p in _frozen_parameters(model))


def test_caption_step_leaves_the_language_group_bit_for_bit() -> None:
    model = build_model(tiny_config()).train()
    move_gates(model)
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in groups[g]], "weight_decay": 0.05} for g in ("visual", "language")], lr=1e-2
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.set_trainable(["visual"])
    _backward(model, image_batch())
    optimizer.step()
    visual = {name for name, _ in groups["visual"]}
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (name in visual), name


def test_tiny_counts_follow_the_formulas() -> None:
    counts = count_parameters(build_model(tiny_config()))
    width, ffn = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
    layers = TINY_LLAMA["num_hidden_layers"]
    kv_width = width // TINY_LLAMA["num_attention_heads"] * TINY_LLAMA["num_key_value_heads"]
    outputs_per_layer = 2 * width + 2 * kv_width + 2 * ffn + width  # q, o; k, v; gate, up; down
    assert counts.by_kind["bias"] == counts.by_kind["scale"] == layers * outputs_per_layer
    assert counts.by_kind["norm"] == (2 * layers + 1) * width
    assert counts.by_kind["prompt"] == 3 * 2 * width  # prompt_len x prompt layers x width
    assert counts.by_group_and_kind["visual"]["gate"] == 4  # layer 0, one gate per head
    assert counts.by_group_and_kind["language"]["gate"] == 2 * 4
    clip_proj, query, bridge = 48 * 32 + 32 + 2 * 32, 3 * 32, 32
    norms, attention = 4 * bridge, (3 * bridge * bridge + 3 * bridge) + (bridge * bridge + bridge)
    block = norms + attention + (bridge * 4 * bridge + 4 * bridge) + (4 * bridge * bridge + bridge)
    visual_proj = 32 * width + width + 2 * width
    assert counts.by_kind["visual"] == clip_proj + query + block + visual_proj


def test_prompts_and_gates_learn_over_optimizer_steps() -> None:
    """Prompt keys/values are rebuilt each step, so prompt updates keep reaching the loss."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    model.set_trainable(["language"])
    optimizer = torch.optim.AdamW([p for _, p in model.parameter_groups()["language"]], lr=1e-2)
    tokens = token_batch()
    prompt = model.base.model.layers[3].self_attn.prompt
    start = prompt.detach().clone()
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=_caption_labels(tokens)).loss
        assert loss is not None
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert not torch.equal(prompt.detach(), start)
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(value > 0 for name, value in model.gate_values().items() if name.endswith("adaptation"))


def test_an_unknown_group_name_is_refused() -> None:
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="unknown parameter group 'vision'; the groups are"):
        model.set_trainable(["vision"])  # type: ignore[list-item]


def test_each_declaration_matches_the_method_table() -> None:
    """The groups of docs/METHOD.md §4 and MM's decay rule (matrices only), restated here by name."""
    model = build_model(tiny_config({"lora_rank": 2}))
    kinds = {"bias": "bias", "scale": "scale", "lora_a": "lora", "lora_b": "lora", "gate": "gate",
             "prompt": "prompt", "weight": "norm"}
    for name, parameter, trainable in model.adapter_parameters():
        visual = name.startswith("visual_bridge.") or name == "base.model.layers.0.self_attn.gate"
        assert trainable.group == ("visual" if visual else "language"), name
        leaf = name.rsplit(".", 1)[-1]
        assert trainable.kind == ("visual" if name.startswith("visual_bridge.") else kinds[leaf]), name
        assert trainable.decays == (parameter.ndim >= 2), name
        assert parameter.requires_grad, name
