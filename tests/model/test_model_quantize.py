"""A quantised frozen base (model.base.quantize: int8 | nf4): bounded error, frozen, trainable, adapter-only.

Measured on the tiny model (4 layers, width 64, fp32, CPU): relative L2 error of the logits
against the full-precision base, adapter moved off its initial values, 0.0072 (int8) and
0.023 (nf4); the bounds below are about 2x those.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import image_batch, perturb_adapter, tiny_config, token_batch
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.config import Config
from llama_adapter_v2.model.adapter import LlamaAdapterV2, decoder_linears
from llama_adapter_v2.model.adapter_linear import AdaptedLinear
from llama_adapter_v2.model.build import build_base, build_model
from llama_adapter_v2.model.checkpoint import load_adapter, save_adapter
from llama_adapter_v2.model.fold import QuantizedBaseFoldError, export_folded
from llama_adapter_v2.model.params import count_parameters
from llama_adapter_v2.model.quantize import (
    INT8_LEVELS,
    NF4_BLOCK,
    NF4_LEVELS,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
)

KINDS = ("int8", "nf4")
LOGIT_ERROR = {"int8": 0.015, "nf4": 0.05}
NF4_HALF_GAP = max(b - a for a, b in itertools.pairwise(NF4_LEVELS)) / 2


def _model(kind: str, adapter: dict | None = None) -> LlamaAdapterV2:
    model = build_model(tiny_config(adapter, base={"quantize": kind}))
    perturb_adapter(model)
    return model


def _frozen_pairs(kind: str) -> list[tuple[torch.Tensor, QuantizedLinear]]:
    """(full-precision weight, its quantised layer) for every decoder linear (the same seeded base)."""
    cfg = tiny_config(base={"quantize": kind})
    full = build_base(cfg.model.base.model_copy(update={"quantize": "none"}), device=torch.device("cpu"),
                      dtype=torch.float32)
    quantised = build_base(cfg.model.base, device=torch.device("cpu"), dtype=torch.float32)
    pairs = zip(decoder_linears(full), decoder_linears(quantised), strict=True)
    return [(getattr(owner, name).weight.detach(), getattr(other, name))
            for (owner, name), (other, _) in pairs]


def test_int8_error_is_at_most_half_a_step_of_each_row() -> None:
    for weight, layer in _frozen_pairs("int8"):
        assert isinstance(layer, Int8Linear) and layer.codes.dtype == torch.int8
        step = weight.abs().amax(dim=1, keepdim=True) / INT8_LEVELS
        error = (layer.dequantized_weight() - weight).abs()
        assert (error <= step / 2 * (1 + 1e-5) + 1e-8).all()


def test_nf4_error_is_at_most_half_a_level_gap_plus_the_double_quantised_absmax_error() -> None:
    """|w - w'| <= half the widest gap of the NF4 code times the block's absmax, plus the error of the
    absmax as double quantisation stores it (every level has |level| <= 1)."""
    for weight, layer in _frozen_pairs("nf4"):
        assert isinstance(layer, NF4Linear) and layer.codes.dtype == torch.uint8
        assert layer.codes.numel() == weight.numel() // 2  # two 4-bit codes a byte
        blocks = weight.reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1)
        stored_absmax = layer.dequantized_absmax()
        bound = NF4_HALF_GAP * absmax + (stored_absmax - absmax).abs()
        error = (layer.dequantized_weight().reshape(-1, NF4_BLOCK) - blocks).abs()
        assert (error <= bound[:, None] * (1 + 1e-5) + 1e-7).all()
        assert ((stored_absmax - absmax).abs() <= absmax.max() / INT8_LEVELS).all()
        assert float(error.norm() / blocks.norm()) < 0.12  # QLoRA's code: ~0.09 on Gaussian weights


@pytest.mark.parametrize("kind", KINDS)
def test_quantised_logits_are_close_to_the_full_precision_ones(kind: str) -> None:
    tokens, images = token_batch(), image_batch()
    with torch.no_grad():
        full = _model("none").eval()(tokens, images=images).logits
        quantised = _model(kind).eval()(tokens, images=images).logits
    assert 0 < float((quantised - full).norm() / full.norm()) < LOGIT_ERROR[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_stays_frozen_and_the_adapter_counts_do_not_change(kind: str) -> None:
    full, quantised = count_parameters(_model("none")), count_parameters(model := _model(kind))
    assert quantised.as_dict() == full.as_dict()
    quantised_layers = [layer for layer in model.modules() if isinstance(layer, QuantizedLinear)]
    stored = [p for layer in quantised_layers for p in layer.storage()]
    assert len(stored) > 0 and not any(p.requires_grad for p in stored)
    wrapped = [layer for layer in model.modules() if isinstance(layer, AdaptedLinear)]
    assert wrapped and all(isinstance(layer.frozen, QuantizedLinear) for layer in wrapped)
    assert all(p.dtype == torch.float32 for _, p in model.adapter_named_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_lower_the_loss_and_leave_the_codes_bit_for_bit(kind: str) -> None:
    model = _model(kind, {"lora_rank": 2}).train()
    codes = {name: p.detach().clone() for name, p in model.base.named_parameters()
             if not p.is_floating_point()}
    optimizer = torch.optim.AdamW([p for _, p in model.adapter_named_parameters()], lr=1e-2)
    tokens, images = token_batch(4, 12), image_batch(4)
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens, images=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.base.named_parameters())
    assert codes and all(torch.equal(after[name], stored) for name, stored in codes.items())
    assert all(p.grad is None for p in model.base.parameters() if not p.requires_grad)


def test_a_quantised_layer_keeps_no_tensor_for_the_backward_and_dequantises_there() -> None:
    """A plain linear would keep its full-precision weight for the input gradient."""
    layer = NF4Linear(torch.nn.Linear(128, 64, bias=False))
    x = torch.randn(3, 128, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(dim=0).expand(3, -1))


def test_bf16_autocast_runs_the_quantised_matmul_in_bf16() -> None:
    model = _model("nf4").train()
    tokens = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens, images=image_batch()).loss
    loss.backward()
    gradients = [p.grad for _, p in model.adapter_named_parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


def test_checkpointing_a_quantised_base_gives_the_same_gradients() -> None:
    model = _model("nf4").train()
    tokens = token_batch()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(tokens, labels=tokens, images=image_batch()).loss.backward()
        return {name: p.grad.clone() for name, p in model.adapter_named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_activation_checkpointing()
    for name, gradient in gradients().items():
        torch.testing.assert_close(gradient, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_adapter_checkpoint_is_the_same_and_loads_on_either_base(tmp_path: Path) -> None:
    model = _model("nf4")
    save_adapter(model, tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert stored.keys() == dict(model.adapter_named_parameters()).keys()
    assert sum(t.numel() for t in stored.values()) == count_parameters(model).trainable
    for kind in ("none", "nf4"):
        other = load_adapter(build_model(tiny_config(base={"quantize": kind})), tmp_path / "adapter")
        for name, parameter in other.adapter_named_parameters():
            assert torch.equal(parameter, stored[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_folding_into_a_quantised_base_is_refused_naming_the_setting(kind: str, tmp_path: Path) -> None:
    model = _model(kind)
    with pytest.raises(QuantizedBaseFoldError, match=f"model.base.quantize is {kind}"):
        export_folded(model, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()
    base_folder = tmp_path / "base"
    full_base = build_base(tiny_config().model.base, device=torch.device("cpu"), dtype=torch.float32)
    full_base.save_pretrained(base_folder)
    cfg = tiny_config(base={"quantize": kind, "path": str(base_folder)})
    save_adapter(build_model(cfg), tmp_path / "adapter")
    arguments = ["fold", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and "model.base.quantize" in result.output


def test_meta_builds_count_a_quantised_config_like_the_full_one() -> None:
    """lav2 params builds on the meta device, where nothing is quantised."""
    cfg = tiny_config(base={"quantize": "nf4"})
    meta = build_model(Config.model_validate(cfg.model_dump()), device="meta")
    assert not any(isinstance(layer, QuantizedLinear) for layer in meta.modules())
    assert count_parameters(meta).as_dict() == count_parameters(build_model(tiny_config())).as_dict()


def test_generation_over_a_quantised_base_runs_with_prompts_and_images() -> None:
    model = _model("nf4").eval()
    tokens = token_batch(1, 5)
    new = model.generate(tokens, images=image_batch(1), max_new_tokens=4, do_sample=False)
    assert new.shape == (1, 9) and torch.equal(new[:, :5], tokens)
