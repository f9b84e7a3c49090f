"""The cases that run in the project's venv, one per child process.

Usage (by the runner): ``python -m benchmarks.cases CASE --spec '<json>'``; the child prints one
``BENCH-RESULT {json}`` line. Every model is built from a config with random weights: nothing
is downloaded. Peers (transformers full fine-tuning, PEFT LoRA and adaption prompt) get the
same shape, batch, optimiser and thread count as the project's model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # Built directly in the run's dtype: an fp32 build then a cast would put a transient fp32
    # copy (27 GB for 7B) into the peak memory that the peers are compared on.
    with torch.device(spec.workload.device):
        return LlamaForCausalLM._from_config(config, dtype=measure.torch_dtype(spec.workload.dtype))


@dataclass
class TrainingSetup:
    """A model ready to train one step, and what its step costs in model FLOPs."""

    model: torch.nn.Module
    compute_loss: Callable[[], torch.Tensor]
    plan: flops.BackwardPlan
    lm_head_positions: int  # per sequence
    extra_flops: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# Every project-venv training case imports the same libraries before its baseline RSS is read,
# so peak RSS compares model and training memory, not import footprints.
TRAINING_IMPORTS = (
    "transformers.models.llama",
    "transformers.models.clip",
    "peft",
    "llama_adapter_v2.config",
)


def time_training(spec: Spec, setup: TrainingSetup, *, rss_before: float) -> dict[str, Any]:
    """Time AdamW steps over the model's trainable parameters and account their model FLOPs."""
    work = spec.workload
    params = [p for p in setup.model.parameters() if p.requires_grad]
    seconds = measure.time_steps(
        measure.training_step(params, setup.compute_loss),
        warmup=work.warmup_steps,
        timed=work.timed_steps,
        device=work.device,
    )
    lm_tokens = work.batch_size * setup.lm_head_positions
    step_flops = flops.llama_train_flops(spec.llama, work.tokens_per_step, lm_tokens, setup.plan)
    return measure.step_result(
        seconds,
        items_per_step=work.tokens_per_step,
        unit="tokens/s",
        flops_per_step=step_flops + setup.extra_flops,
        trainable_params=sum(p.numel() for p in params),
        rss_before_model_mb=rss_before,
        device=work.device,
        lm_head_positions=setup.lm_head_positions,
        **setup.extra,
    )


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: model(**batch).loss


def setup_full_finetune(spec: Spec) -> TrainingSetup:
    model = hf_llama(spec)
    layers = spec.llama.num_hidden_layers
    plan = flops.BackwardPlan(backprop_layers=layers, weight_grad_layers=layers, lm_head_weight_grad=True)
    return TrainingSetup(model, hf_loss(model, batches.text_batch(spec)), plan, spec.workload.seq_len)


def setup_peft_lora(spec: Spec) -> TrainingSetup:
    from peft import LoraConfig, get_peft_model

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
    lora_flops = flops.extra_trainable_flops(lora_params, spec.workload.tokens_per_step)
    return TrainingSetup(
        model, hf_loss(model, batches.text_batch(spec)), plan, spec.workload.seq_len, extra_flops=lora_flops
    )


def setup_peft_adaption_prompt(spec: Spec) -> TrainingSetup:
    """LLaMA-Adapter V1 as PEFT implements it: prompts and gates in the last layers only."""
    from peft import AdaptionPromptConfig, get_peft_model

    work = spec.workload
    config = AdaptionPromptConfig(
        adapter_len=work.prompt_len, adapter_layers=work.prompt_layers, task_type="CAUSAL_LM"
    )
    model = get_peft_model(hf_llama(spec), config)
    plan = flops.BackwardPlan(backprop_layers=work.prompt_layers)
    return TrainingSetup(model, hf_loss(model, batches.text_batch(spec)), plan, work.seq_len)


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


def setup_adapter_v2_language(spec: Spec) -> TrainingSetup:
    """The language group (prompts, gates, biases, scales, norms) on a text batch, text-only model."""
    model = build_project_model(spec, visual=False)
    model.set_trainable(["language"])
    batch = batches.text_batch(spec)
    positions = projected_positions(model, batch, spec.workload.seq_len)
    plan = flops.BackwardPlan(backprop_layers=spec.llama.num_hidden_layers)
    return TrainingSetup(model, lambda: model(**batch).loss, plan, positions)


def setup_adapter_v2_visual(spec: Spec) -> TrainingSetup:
    """The visual group (bridge, visual gates) on an image-text batch: tower forward, bridge trained."""
    model = build_project_model(spec, visual=True)
    model.set_trainable(["visual"])
    work = spec.workload
    batch = {**batches.text_batch(spec), "images": batches.image_batch(spec, measure.torch_dtype(work.dtype))}
    positions = projected_positions(model, batch, work.seq_len)
    plan = flops.BackwardPlan(backprop_layers=spec.llama.num_hidden_layers)
    visual = flops.visual_path_flops(spec.vision, spec.llama.hidden_size, work.batch_size)
    return TrainingSetup(
        model,
        lambda: model(**batch).loss,
        plan,
        positions,
        extra_flops=visual,
        extra={"images_per_step": work.batch_size},
    )


TRAINING_SETUPS: dict[str, Callable[[Spec], TrainingSetup]] = {
    "train_full_finetune": setup_full_finetune,
    "train_peft_lora": setup_peft_lora,
    "train_peft_adaption_prompt": setup_peft_adaption_prompt,
    "train_adapter_v2_language": setup_adapter_v2_language,
    "train_adapter_v2_visual": setup_adapter_v2_visual,
}


def training_case(name: str) -> CaseFn:
    """The timed case of one training setup: same imports, optimiser and accounting for all."""

    def run(spec: Spec) -> dict[str, Any]:
        measure.configure(spec.workload.threads, spec.workload.device)
        rss_before = measure.rss_after_imports(*TRAINING_IMPORTS)
        return time_training(spec, TRAINING_SETUPS[name](spec), rss_before=rss_before)

    return run


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


# --------------------------------------------------------------------------- data and orchestration


def shard_reading(spec: Spec) -> dict[str, Any]:
    """Full passes of the project's loader over the demo caption shards (benchmarks/shard_reading.py).

    The data helper's script builds the shards and the tokenizer; each timed step is one pass of
    ``make_loader`` as the demo config runs it (no workers; images decoded, captions tokenized,
    collated). One pass with two workers and one of plain webdataset decoding are reported beside it.
    """
    import tempfile
    from pathlib import Path

    import webdataset as wds

    from benchmarks import shard_reading as reading
    from llama_adapter_v2.data.shards import ShardIndex, make_loader

    work = spec.workload
    measure.configure(work.threads, work.device)
    rss_before = measure.rss_after_imports("webdataset", "llama_adapter_v2.data.shards")
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = reading.prepare(Path(tmp))
        count = ShardIndex.load(folder).count
        urls = sorted(str(path) for path in folder.glob("*.tar"))

        def loader(workers: int = 0) -> Any:
            return make_loader(
                folder,
                tokenizer=tokenizer,
                batch_size=16,
                max_tokens=48,
                image_transform=reading.to_tensor,
                seed=0,
                epoch=0,
                num_workers=workers,
            )

        def one_pass() -> int:
            return sum(len(batch["ids"]) for batch in loader())

        seconds = measure.time_steps(one_pass, warmup=1, timed=work.timed_steps, device="cpu")
        two_workers = reading.samples_per_second(lambda: loader(2), lambda batch: len(batch["ids"]), 1)
        plain = reading.samples_per_second(
            lambda: wds.WebDataset(urls, shardshuffle=False).decode("pil"), lambda _: 1, 1
        )
    return measure.step_result(
        seconds,
        items_per_step=count,
        unit="samples/s",
        flops_per_step=None,
        trainable_params=None,
        rss_before_model_mb=rss_before,
        device="cpu",
        samples_per_pass=count,
        two_workers_samples_per_s=two_workers,
        webdataset_decode_samples_per_s=plain,
    )


def orchestration_overhead(spec: Spec) -> dict[str, Any]:
    from benchmarks.orchestration import orchestration_overhead as measure_overhead

    return measure_overhead(spec)


# --------------------------------------------------------------------------- registry and entry point

# Cases that time many passes (shard reading) or alternate their two sides (orchestration)
# inside one child, and take minutes: the runner starts them in the first round only.
ONCE_PER_RUN = frozenset({"shard_reading", "orchestration_overhead"})

CASES: dict[str, CaseFn] = {
    "matmul_ceiling": matmul_ceiling,
    **{name: training_case(name) for name in TRAINING_SETUPS},
    "generate_base": generate_base,
    "generate_adapter_v2_unfolded": generate_adapter_v2_unfolded,
    "generate_adapter_v2_folded": generate_adapter_v2_folded,
    "generate_folded_without_prompts": generate_folded_without_prompts,
    "shard_reading": shard_reading,
    "orchestration_overhead": orchestration_overhead,
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
