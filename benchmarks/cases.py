"""The cases that run in the project's venv, one per child process.

Usage (by the runner): ``python -m benchmarks.cases CASE --spec '<json>'``; the child prints one
``BENCH-RESULT {json}`` line. Every model is built from a config with random weights: nothing
is downloaded. Peers (transformers full fine-tuning, PEFT LoRA and adaption prompt) get the
same shape, batch, optimiser and thread count as the project's model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import batches, flops, measure
from benchmarks.spec import Spec

CaseFn = Callable[[Spec], dict[str, Any]]


# --------------------------------------------------------------------------- machine


def matmul_ceiling(spec: Spec) -> dict[str, Any]:
    """Sustained fp32 (or the preset's dtype) GEMM rate: the denominator of every MFU."""
    work = spec.workload
    measure.configure(work.threads, work.device)
    rss_before = measure.current_rss_mb()
    n = work.matmul_size
    dtype = measure.torch_dtype(work.dtype)
    a, b = (torch.randn(n, n, device=work.device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=work.device, dtype=dtype)
    seconds = measure.time_steps(
        lambda: torch.mm(a, b, out=out), warmup=work.warmup_steps, timed=work.timed_steps, device=work.device
    )
    return measure.step_result(
        seconds,
        items_per_step=2 * n**3 / 1e9,
        unit="GFLOP/s",
        flops_per_step=None,
        trainable_params=None,
        rss_before_model_mb=rss_before,
        device=work.device,
        model_shaped_gflops=model_shaped_rates(spec),
    )


def model_shaped_rates(spec: Spec) -> dict[str, float]:
    """GFLOP/s of the decoder's own GEMM shapes (tokens x width x out): what the model can reach."""
    work, shape = spec.workload, spec.llama
    tokens = work.tokens_per_step
    dtype = measure.torch_dtype(work.dtype)
    shapes = {"qkvo": shape.hidden_size, "mlp_up": shape.intermediate_size, "lm_head": shape.vocab_size}
    rates = {}
    for name, out_features in shapes.items():
        x = torch.randn(tokens, shape.hidden_size, device=work.device, dtype=dtype)
        w = torch.randn(out_features, shape.hidden_size, device=work.device, dtype=dtype)
        seconds = measure.time_steps(
            lambda x=x, w=w: x @ w.T, warmup=2, timed=max(3, work.timed_steps), device=work.device
        )
        rates[name] = 2 * tokens * shape.hidden_size * out_features / sorted(seconds)[len(seconds) // 2] / 1e9
    return rates


# --------------------------------------------------------------------------- transformers peers


def hf_llama(spec: Spec) -> Any:
    """A plain transformers LlamaForCausalLM with the shared shape and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = spec.llama
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
    )
    torch.manual_seed(spec.workload.seed)
    with torch.device(spec.workload.device):
        model = LlamaForCausalLM(config)
    return model.to(measure.torch_dtype(spec.workload.dtype))


def time_training(
    spec: Spec,
    model: torch.nn.Module,
    compute_loss: Callable[[], torch.Tensor],
    plan: flops.BackwardPlan,
    *,
    rss_before: float,
    lm_head_positions: int,
    extra_flops: float = 0.0,
    items_per_step: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Time AdamW steps over the model's trainable parameters and account their model FLOPs."""
    work = spec.workload
    params = [p for p in model.parameters() if p.requires_grad]
    seconds = measure.time_steps(
        measure.training_step(params, compute_loss),
        warmup=work.warmup_steps,
        timed=work.timed_steps,
        device=work.device,
    )
    lm_tokens = work.batch_size * lm_head_positions
    step_flops = flops.llama_train_flops(spec.llama, work.tokens_per_step, lm_tokens, plan) + extra_flops
    return measure.step_result(
        seconds,
        items_per_step=items_per_step or work.tokens_per_step,
        unit="tokens/s",
        flops_per_step=step_flops,
        trainable_params=sum(p.numel() for p in params),
        rss_before_model_mb=rss_before,
        device=work.device,
        lm_head_positions=lm_head_positions,
        **extra,
    )


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: model(**batch).loss


def train_full_finetune(spec: Spec) -> dict[str, Any]:
    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama")
    model = hf_llama(spec)
    layers = spec.llama.num_hidden_layers
    plan = flops.BackwardPlan(backprop_layers=layers, weight_grad_layers=layers, lm_head_weight_grad=True)
    return time_training(
        spec,
        model,
        hf_loss(model, batches.text_batch(spec)),
        plan,
        rss_before=rss_before,
        lm_head_positions=spec.workload.seq_len,
    )


def train_peft_lora(spec: Spec) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama")
    rank = spec.workload.lora_rank
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(hf_llama(spec), config)
    shape = spec.llama
    kv_width = shape.num_key_value_heads * shape.head_dim
    lora_params = shape.num_hidden_layers * rank * (2 * shape.hidden_size + shape.hidden_size + kv_width)
    plan = flops.BackwardPlan(backprop_layers=shape.num_hidden_layers)
    return time_training(
        spec,
        model,
        hf_loss(model, batches.text_batch(spec)),
        plan,
        rss_before=rss_before,
        lm_head_positions=spec.workload.seq_len,
        extra_flops=flops.extra_trainable_flops(lora_params, spec.workload.tokens_per_step),
    )


def train_peft_adaption_prompt(spec: Spec) -> dict[str, Any]:
    """LLaMA-Adapter V1 as PEFT implements it: prompts and gates in the last layers only."""
    from peft import AdaptionPromptConfig, get_peft_model

    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama")
    work = spec.workload
    config = AdaptionPromptConfig(
        adapter_len=work.prompt_len, adapter_layers=work.prompt_layers, task_type="CAUSAL_LM"
    )
    model = get_peft_model(hf_llama(spec), config)
    plan = flops.BackwardPlan(backprop_layers=work.prompt_layers)
    return time_training(
        spec,
        model,
        hf_loss(model, batches.text_batch(spec)),
        plan,
        rss_before=rss_before,
        lm_head_positions=work.seq_len,
    )


# --------------------------------------------------------------------------- the project's model


def project_config(spec: Spec, *, visual: bool, prompts: bool = True) -> Any:
    """The project's Config for the shared shape; ``visual=False`` builds no CLIP tower at all."""
    from llama_adapter_v2.config import Config

    shape, vision, work = spec.llama, spec.vision, spec.workload
    llama_keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
    )
    clip_keys = (
        "image_size",
        "patch_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "projection_dim",
    )
    adapter = {
        "prompt_len": work.prompt_len if prompts else 0,
        "prompt_layers": work.prompt_layers,
        "visual_layers": 1 if visual else 0,
        "visual": {
            "n_query": vision.n_query,
            "width": vision.bridge_width,
            "n_blocks": vision.bridge_blocks,
            "n_heads": vision.bridge_heads,
        },
    }
    return Config.model_validate(
        {
            "name": f"bench-{spec.preset}",
            "model": {
                "base": {"arch": {k: getattr(shape, k) for k in llama_keys}, "attn_implementation": "sdpa"},
                "vision": {"arch": {k: getattr(vision, k) for k in clip_keys}},
                "adapter": adapter,
            },
        }
    )


def build_project_model(spec: Spec, *, visual: bool, prompts: bool = True) -> Any:
    """``build_model`` of the project, or a not-available result when model/ is not there yet."""
    try:
        from llama_adapter_v2.model.build import build_model
    except ImportError as err:
        raise measure.CaseNotAvailableError(f"llama_adapter_v2.model not importable: {err}") from err
    cfg = project_config(spec, visual=visual, prompts=prompts)
    return build_model(cfg, device=spec.workload.device, dtype=measure.torch_dtype(spec.workload.dtype))


def projected_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor], seq_len: int) -> int:
    """Positions per sequence the model projects onto the vocabulary, read off its logits."""
    with torch.no_grad():
        logits = model(**batch).logits
    batch_size = batch["input_ids"].shape[0]
    return (
        logits.shape[1]
        if logits.dim() == 3
        else logits.shape[0] // batch_size
        if logits.shape[0]
        else seq_len
    )


def train_adapter_v2_language(spec: Spec) -> dict[str, Any]:
    """The language group (prompts, gates, biases, scales, norms) on a text batch, text-only model."""
    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama", "llama_adapter_v2.config")
    model = build_project_model(spec, visual=False)
    model.set_trainable(["language"])
    batch = batches.text_batch(spec)
    positions = projected_positions(model, batch, spec.workload.seq_len)
    plan = flops.BackwardPlan(backprop_layers=spec.llama.num_hidden_layers)
    return time_training(
        spec, model, lambda: model(**batch).loss, plan, rss_before=rss_before, lm_head_positions=positions
    )


def train_adapter_v2_visual(spec: Spec) -> dict[str, Any]:
    """The visual group (bridge, visual gates) on an image-text batch: tower forward, bridge trained."""
    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama", "transformers.models.clip")
    model = build_project_model(spec, visual=True)
    model.set_trainable(["visual"])
    work = spec.workload
    batch = {**batches.text_batch(spec), "images": batches.image_batch(spec, measure.torch_dtype(work.dtype))}
    positions = projected_positions(model, batch, work.seq_len)
    plan = flops.BackwardPlan(backprop_layers=spec.llama.num_hidden_layers)
    visual = flops.visual_path_flops(spec.vision, spec.llama.hidden_size, work.batch_size)
    return time_training(
        spec,
        model,
        lambda: model(**batch).loss,
        plan,
        rss_before=rss_before,
        lm_head_positions=positions,
        extra_flops=visual,
        images_per_step=work.batch_size,
    )


# --------------------------------------------------------------------------- generation


def time_generation(
    spec: Spec, generate: Callable[..., torch.Tensor], *, rss_before: float, **extra: Any
) -> dict[str, Any]:
    """Greedy decoding of exactly gen_new_tokens per sequence (EOS cannot end it early)."""
    work = spec.workload
    prompt = batches.prompt_ids(spec)
    mask = torch.ones_like(prompt)
    new = work.gen_new_tokens

    def step() -> torch.Tensor:
        out = generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        if out.shape[1] != prompt.shape[1] + new:
            raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, expected {new}")
        return out

    seconds = measure.time_steps(step, warmup=work.warmup_steps, timed=work.timed_steps, device=work.device)
    return measure.step_result(
        seconds,
        items_per_step=work.batch_size * new,
        unit="tokens/s",
        flops_per_step=None,
        trainable_params=None,
        rss_before_model_mb=rss_before,
        device=work.device,
        **extra,
    )


@torch.no_grad()
def as_if_trained(model: torch.nn.Module) -> torch.nn.Module:
    """Move every adapter parameter off its initial value (zero gates would hide the prompt path)."""
    generator = torch.Generator().manual_seed(1)
    for _, parameter in model.adapter_named_parameters():
        noise = torch.randn(parameter.shape, generator=generator).to(parameter)
        parameter.add_(0.02 * noise)
    return model.eval()


def generate_base(spec: Spec) -> dict[str, Any]:
    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama")
    model = hf_llama(spec).eval()
    return time_generation(spec, model.generate, rss_before=rss_before)


def generate_adapter_v2_unfolded(spec: Spec) -> dict[str, Any]:
    """Bias and scale as separate terms, prompts and gates on (computed once per generate call)."""
    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama", "llama_adapter_v2.config")
    model = as_if_trained(build_project_model(spec, visual=False))
    return time_generation(spec, model.generate, rss_before=rss_before)


def generate_adapter_v2_folded(spec: Spec) -> dict[str, Any]:
    """Bias and scale folded into the weights (model/fold.py); prompts and gates do not fold."""
    from llama_adapter_v2.model.fold import fold_adapter

    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama", "llama_adapter_v2.config")
    model = fold_adapter(as_if_trained(build_project_model(spec, visual=False)))
    return time_generation(spec, model.generate, rss_before=rss_before)


def generate_folded_without_prompts(spec: Spec) -> dict[str, Any]:
    """A prompt-free adapter (bias, scale, norms) folded: a stock transformers Llama with biases."""
    from llama_adapter_v2.model.fold import fold_adapter

    measure.configure(spec.workload.threads, spec.workload.device)
    rss_before = measure.rss_after_imports("transformers.models.llama", "llama_adapter_v2.config")
    model = fold_adapter(as_if_trained(build_project_model(spec, visual=False, prompts=False)))
    return time_generation(
        spec, model.base.generate, rss_before=rss_before, model_class=type(model.base).__name__
    )


# --------------------------------------------------------------------------- registry and entry point

CASES: dict[str, CaseFn] = {
    "matmul_ceiling": matmul_ceiling,
    "train_full_finetune": train_full_finetune,
    "train_peft_lora": train_peft_lora,
    "train_peft_adaption_prompt": train_peft_adaption_prompt,
    "train_adapter_v2_language": train_adapter_v2_language,
    "train_adapter_v2_visual": train_adapter_v2_visual,
    "generate_base": generate_base,
    "generate_adapter_v2_unfolded": generate_adapter_v2_unfolded,
    "generate_adapter_v2_folded": generate_adapter_v2_folded,
    "generate_folded_without_prompts": generate_folded_without_prompts,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--spec", required=True, help="the Spec as JSON")
    args = parser.parse_args()
    spec = Spec.from_json(args.spec)
    measure.run_and_emit(args.case, lambda: CASES[args.case](spec))


if __name__ == "__main__":
    main()
