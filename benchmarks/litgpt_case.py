"""LitGPT's adapter_v2 training step on the shared shape; runs in benchmarks/.venv-litgpt only.

LitGPT pins a huggingface-hub that breaks transformers 5.x, so it never shares a venv with
the project. This module imports nothing of the project beyond the standard-library/torch
helpers of ``benchmarks``.

Usage (by the runner): ``.venv-litgpt/bin/python -m benchmarks.litgpt_case --spec '<json>'``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import batches, flops, measure
from benchmarks.spec import Spec

CASE = "train_litgpt_adapter_v2"


def litgpt_config(spec: Spec) -> Any:
    """A LitGPT Llama config with the same shape, prompt length and prompted layers as ours."""
    from litgpt.adapter_v2 import Config

    shape = spec.llama
    return Config(
        name="bench-llama",
        block_size=max(spec.workload.seq_len, shape.max_position_embeddings),
        vocab_size=shape.vocab_size,
        padded_vocab_size=shape.vocab_size,
        n_layer=shape.num_hidden_layers,
        n_head=shape.num_attention_heads,
        n_query_groups=shape.num_key_value_heads,
        n_embd=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=shape.rms_norm_eps,
        mlp_class_name="LLaMAMLP",
        adapter_prompt_length=spec.workload.prompt_len,
        adapter_start_layer=shape.num_hidden_layers - spec.workload.prompt_layers,
    )


def clear_prompt_kv(model: torch.nn.Module) -> None:
    """LitGPT caches prompt K/V on the module after the first forward, also in training.

    Reusing them in the next step would backpropagate into the previous step's freed graph
    (or, detached, stop the prompts from learning); a correct training step computes them
    once per step, as the project does.
    """
    for module in model.modules():
        if getattr(module, "adapter_kv_cache", None) is not None:
            module.adapter_kv_cache = None


def measure_litgpt(spec: Spec) -> dict[str, Any]:
    from litgpt.adapter_v2 import GPT, mark_only_adapter_v2_as_trainable

    work = spec.workload
    measure.configure(work.threads, work.device)
    rss_before = measure.current_rss_mb()
    torch.manual_seed(work.seed)
    dtype = measure.torch_dtype(work.dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: no transient fp32 copy in the peak
    try:
        with torch.device(work.device):
            model = GPT(litgpt_config(spec))
    finally:
        torch.set_default_dtype(default_dtype)
    model.max_seq_length = work.seq_len
    mark_only_adapter_v2_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batches.text_batch(spec)

    def loss() -> torch.Tensor:
        clear_prompt_kv(model)
        logits = model(batch["input_ids"])
        return batches.shifted_cross_entropy(logits, batch["labels"])

    seconds = measure.time_steps(
        measure.training_step(params, loss),
        warmup=work.warmup_steps,
        timed=work.timed_steps,
        device=work.device,
    )
    plan = flops.BackwardPlan(backprop_layers=spec.llama.num_hidden_layers)
    step_flops = flops.llama_train_flops(spec.llama, work.tokens_per_step, work.tokens_per_step, plan)
    return measure.step_result(
        seconds,
        items_per_step=work.tokens_per_step,
        unit="tokens/s",
        flops_per_step=step_flops,
        trainable_params=sum(p.numel() for p in params),
        rss_before_model_mb=rss_before,
        device=work.device,
        lm_head_positions=work.seq_len,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the Spec as JSON")
    args = parser.parse_args()
    spec = Spec.from_json(args.spec)
    measure.run_and_emit(CASE, lambda: measure_litgpt(spec))


if __name__ == "__main__":
    main()
