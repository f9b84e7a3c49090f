"""Peak memory and tokens/s of the language step with an nf4, int8 and full-precision base, with and
without activation checkpointing, plus a memory model that predicts 7B and 13B on 24/40/80 GB cards.

    python -m benchmarks.memory                      # the `memory` shape (width 2048), 6 cases, 1 round
    python -m benchmarks.memory --shape tiny --steps 1 --out /tmp/m    # a quick smoke run

One fresh process per case (``python -m benchmarks.memory --child CASE --spec JSON``). The child
builds the project's text-only model (language group trains, as ``train_adapter_v2_language``),
returns freed build memory to the system (``malloc_trim``), then resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``) so that the build, which holds the full-precision base until
each linear is quantised, does not count: the step peak is the high-water mark over the warm-up
and timed steps. ``activations_mb`` is what autograd keeps from the forward for the backward
(distinct storages, parameters excluded); with checkpointing that is each layer's input only,
and the recompute of one layer in the backward comes on top (the step peak includes it).

The memory model (``predicted_peak_bytes``) adds: decoder weights at their bits per weight, the
other frozen weights (embeddings, lm_head, norms) at the compute dtype, 16 bytes per trainable
parameter (fp32 value, gradient and AdamW's two moments), activations per token per layer (in
units of the width, calibrated on the measured full-precision cases), the logits of the
supervised positions and one dequantised weight in flight. Results: ``results/memory-<UTC>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.spec import LlamaShape, Spec, Workload, preset

REPO = Path(__file__).resolve().parents[1]
KINDS = ("none", "int8", "nf4")
CASES = tuple(f"{kind}{suffix}" for kind in KINDS for suffix in ("", "+ckpt"))
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit code, an int8 absmax per 64, an fp32 factor per 256 absmaxes
GIB = 2**30
CARDS_GB = (24, 40, 80)
# Llama-2 7B and 13B (vocabulary 32000), batch 4 x 512 as the gpu-7b preset, bf16 compute.
BIG_SHAPES = {
    "7B": LlamaShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "13B": LlamaShape(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40),
}
CUDA_CONTEXT_BYTES = 0.6 * GIB  # CUDA context and allocator slack, not modelled in detail


def memory_spec(shape: str) -> Spec:
    """``memory``: wide enough that the decoder's weights dominate; ``tiny``: the tests' shape."""
    if shape == "tiny":
        return replace(preset("tiny"), preset="memory-tiny")
    llama = LlamaShape(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16,
                       num_key_value_heads=16)
    return Spec(preset="memory", llama=llama, workload=Workload(warmup_steps=1, timed_steps=2))


# --------------------------------------------------------------------------- the memory model


def decoder_params(shape: LlamaShape) -> int:
    kv = shape.num_key_value_heads * shape.head_dim
    width = shape.hidden_size
    return shape.num_hidden_layers * (2 * width**2 + 2 * width * kv + 3 * width * shape.intermediate_size)


def other_params(shape: LlamaShape) -> int:
    """Embeddings and lm_head (untied) and the norms: never quantised."""
    return 2 * shape.vocab_size * shape.hidden_size + (2 * shape.num_hidden_layers + 1) * shape.hidden_size


def bits_per_weight(kind: str, compute_bytes: int, in_features: int) -> float:
    return {"none": 8.0 * compute_bytes, "int8": 8 + 32 / in_features, "nf4": NF4_BITS}[kind]


@dataclass(frozen=True)
class Activation:
    """Bytes autograd keeps per token, per layer and per unit of width, measured in fp32 (halved for
    bf16); ``checkpointed`` keeps each layer's input and what lies outside the layers."""

    full: float
    checkpointed: float


def predicted_peak_bytes(shape: LlamaShape, *, kind: str, checkpointed: bool, tokens: int,
                         supervised: int, trainable: int, compute_bytes: int,
                         activation: Activation) -> dict[str, float]:
    """Peak training memory, by part (bytes). Activations scale with the compute dtype's width."""
    per_value = compute_bytes / 4
    per_layer_token = (activation.checkpointed if checkpointed else activation.full) * shape.hidden_size
    activations = per_value * per_layer_token * tokens * shape.num_hidden_layers
    if checkpointed:  # the layer being recomputed holds its full activations during its backward
        activations += per_value * activation.full * shape.hidden_size * tokens
    widest = shape.hidden_size * max(shape.intermediate_size, shape.hidden_size)
    parts = {
        "decoder_weights": decoder_params(shape) * bits_per_weight(kind, compute_bytes, shape.hidden_size)
        / 8,
        "other_weights": other_params(shape) * compute_bytes,
        "trainable_state": 16.0 * trainable,
        "activations": activations,
        "logits": 3.0 * 4 * supervised * shape.vocab_size,  # fp32 logits, their softmax and gradient
        "dequantised_in_flight": 0.0 if kind == "none" else 2.0 * compute_bytes * widest,
    }
    return parts | {"total": sum(parts.values())}


def calibrate(results: dict[str, dict[str, Any]], spec: Spec) -> Activation:
    """Activation bytes per token per layer per width unit, from the full-precision cases."""
    tokens, layers = spec.workload.tokens_per_step, spec.llama.num_hidden_layers
    width = spec.llama.hidden_size
    full = results["none"]["activations_mb"] * 2**20 / (tokens * layers * width)
    checkpointed = results["none+ckpt"]["activations_mb"] * 2**20 / (tokens * layers * width)
    return Activation(full=full, checkpointed=checkpointed)


def trainable_of(shape: LlamaShape, spec: Spec) -> int:
    """The language group's size for this shape, counted on the meta device (nothing allocated)."""
    from benchmarks import cases
    from llama_adapter_v2.model.build import build_model
    from llama_adapter_v2.model.params import count_parameters

    cfg = cases.project_config(replace(spec, llama=shape), visual=False)
    return count_parameters(build_model(cfg, device="meta")).by_group["language"]


# --------------------------------------------------------------------------- one case, in its child


def release_freed_memory() -> None:
    """glibc keeps freed heap pages; hand them back so that RSS counts what is alive."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb_since_reset() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def activations_saved_mb(model: Any, compute_loss: Any) -> float:
    """MiB of distinct storages autograd keeps from one forward, parameters and buffers excluded."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def stored_mb(model: Any) -> float:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values()) / 2**20


def run_child(case: str, spec: Spec) -> dict[str, Any]:
    from benchmarks import batches, cases, measure

    work = spec.workload
    measure.configure(work.threads, work.device)
    rss_imports = measure.rss_after_imports("transformers", "llama_adapter_v2.model.build")
    from llama_adapter_v2.model.build import build_model

    kind, checkpointed = case.removesuffix("+ckpt"), case.endswith("+ckpt")
    cfg = cases.project_config(spec, visual=False)
    cfg.model.base.quantize = kind
    model = build_model(cfg, device=work.device, dtype=measure.torch_dtype(work.dtype))
    model.set_trainable(["language"])
    model.train()
    if checkpointed:
        model.enable_activation_checkpointing()
    release_freed_memory()
    batch = batches.text_batch(spec)
    compute_loss = lambda: model(**batch).loss  # noqa: E731
    activations = activations_saved_mb(model, compute_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    step = measure.training_step(params, compute_loss)
    release_freed_memory()
    resident = measure.current_rss_mb()
    reset = reset_peak_rss()
    seconds = measure.time_steps(step, warmup=work.warmup_steps, timed=work.timed_steps, device=work.device)
    step_peak = peak_rss_mb_since_reset() if reset else measure.peak_rss_mb()
    return {
        "case": case, "status": "ok", "quantize": kind, "checkpointing": checkpointed,
        "step_seconds": seconds, "tokens_per_step": work.tokens_per_step,
        "tokens_per_s": work.tokens_per_step / statistics.median(seconds),
        "rss_after_imports_mb": rss_imports, "rss_before_steps_mb": resident, "step_peak_rss_mb": step_peak,
        "peak_reset": reset, "model_tensors_mb": stored_mb(model), "activations_mb": activations,
        "trainable_params": sum(p.numel() for p in params),
        "supervised_positions": int((batch["labels"][:, 1:] != -100).sum()),
    }


# --------------------------------------------------------------------------- parent: cases, model, report


def run_case(case: str, spec: Spec, timeout_s: float) -> dict[str, Any]:
    from benchmarks.measure import RESULT_MARKER
    from benchmarks.runner import child_env

    command = [sys.executable, "-m", "benchmarks.memory", "--child", case, "--spec", spec.to_json()]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(spec), cwd=REPO,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"case": case, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):]) | {"wall_seconds": time.perf_counter() - started}
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"case": case, "status": "failed", "reason": f"exit {done.returncode}: {tail}"}


def summarise(results: dict[str, dict[str, Any]], spec: Spec) -> dict[str, Any]:
    """Step peaks above the imports, ratios against the targets, and the memory model's checks."""
    above = {case: r["step_peak_rss_mb"] - r["rss_after_imports_mb"] for case, r in results.items()}
    transient = {case: r["step_peak_rss_mb"] - r["rss_before_steps_mb"] for case, r in results.items()}
    activation = calibrate(results, spec)
    work = spec.workload
    checks = {}
    for case, result in results.items():
        predicted = predicted_peak_bytes(
            spec.llama, kind=result["quantize"], checkpointed=result["checkpointing"],
            tokens=work.tokens_per_step, supervised=result["supervised_positions"],
            trainable=result["trainable_params"], compute_bytes=4, activation=activation)
        checks[case] = {"predicted_mb": predicted["total"] / 2**20, "measured_mb": above[case],
                        "predicted_over_measured": predicted["total"] / 2**20 / above[case]}
    kept = {case: r["activations_mb"] for case, r in results.items()}
    ratios = {
        "nf4_peak_over_fp_peak": above["nf4"] / above["none"],
        "int8_peak_over_fp_peak": above["int8"] / above["none"],
        "nf4_ckpt_peak_over_fp_peak": above["nf4+ckpt"] / above["none"],
        "nf4_process_peak_over_fp": results["nf4"]["step_peak_rss_mb"] / results["none"]["step_peak_rss_mb"],
        "nf4_model_tensors_over_fp": results["nf4"]["model_tensors_mb"] / results["none"]["model_tensors_mb"],
        "checkpointing_activation_cut": kept["none"] / kept["none+ckpt"],
        "checkpointing_step_memory_cut": transient["none"] / transient["none+ckpt"],
        "checkpointing_step_time_cost": (statistics.median(results["none+ckpt"]["step_seconds"])
                                         / statistics.median(results["none"]["step_seconds"]) - 1),
    }
    return {"peak_above_imports_mb": above, "step_transient_mb": transient, "ratios": ratios,
            "activation_model": asdict(activation), "model_checks": checks}


def big_predictions(spec: Spec, activation: Activation) -> dict[str, Any]:
    """Predicted peak GiB for 7B and 13B, bf16 compute, batch 4 x 512, and which cards hold it."""
    tokens, supervised = 4 * 512, 4 * 256
    table: dict[str, Any] = {}
    for name, shape in BIG_SHAPES.items():
        trainable = trainable_of(shape, spec)
        for kind in KINDS:
            for checkpointed in (False, True):
                parts = predicted_peak_bytes(shape, kind=kind, checkpointed=checkpointed, tokens=tokens,
                                             supervised=supervised, trainable=trainable, compute_bytes=2,
                                             activation=activation)
                total = (parts["total"] + CUDA_CONTEXT_BYTES) / GIB
                key = f"{name} {kind}{' +ckpt' if checkpointed else ''}"
                table[key] = {"predicted_gib": total, "fits": {f"{card} GB": total * GIB <= card * 1e9
                                                               for card in CARDS_GB},
                              "weights_gib": (parts["decoder_weights"] + parts["other_weights"]) / GIB,
                              "activations_gib": parts["activations"] / GIB}
    return table


def markdown(report: dict[str, Any]) -> str:
    results, summary = report["results"], report["summary"]
    lines = [f"# Memory: quantised base and activation checkpointing ({report['spec']['preset']}, "
             f"{report['utc']})", "",
             "| case | tokens/s | step peak RSS MiB | above imports MiB | step transient MiB | "
             "autograd keeps MiB | model tensors MiB | predicted MiB | predicted / measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, r in results.items():
        check = summary["model_checks"][case]
        above, transient = summary["peak_above_imports_mb"][case], summary["step_transient_mb"][case]
        lines.append(f"| {case} | {r['tokens_per_s']:.1f} | {r['step_peak_rss_mb']:.0f} | {above:.0f} | "
                     f"{transient:.0f} | {r['activations_mb']:.1f} | {r['model_tensors_mb']:.0f} | "
                     f"{check['predicted_mb']:.0f} | {check['predicted_over_measured']:.2f} |")
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    targets = {"nf4_peak_over_fp_peak": "<= 0.35", "checkpointing_activation_cut": ">= 3",
               "checkpointing_step_time_cost": "<= 0.35"}
    lines += [f"| {k} | {v:.3f} | {targets.get(k, '')} |" for k, v in summary["ratios"].items()]
    lines += ["", "Predicted peak (bf16 compute, batch 4 x 512, + 0.6 GiB CUDA context):", "",
              "| model | GiB | weights GiB | activations GiB | "
              + " | ".join(f"{card} GB" for card in CARDS_GB) + " |",
              "|---|---:|---:|---:|" + "---|" * len(CARDS_GB)]
    for key, row in report["predicted"].items():
        fits = " | ".join("fits" if ok else "-" for ok in row["fits"].values())
        lines.append(f"| {key} | {row['predicted_gib']:.1f} | {row['weights_gib']:.1f} | "
                     f"{row['activations_gib']:.1f} | {fits} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = memory_spec(args.shape)
    if args.steps is not None:
        spec = replace(spec, workload=replace(spec.workload, timed_steps=args.steps))
    results: dict[str, dict[str, Any]] = {}
    for case in CASES:
        result = run_case(case, spec, args.timeout)
        print(f"{case}: {result.get('status')} {result.get('reason', '')}", flush=True)
        if result["status"] != "ok":
            raise SystemExit(f"{case} failed: {result.get('reason')}")
        results[case] = result
    summary = summarise(results, spec)
    predicted = big_predictions(spec, Activation(**summary["activation_model"]))
    utc = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    return {"utc": utc, "spec": json.loads(spec.to_json()), "results": results, "summary": summary,
            "predicted": predicted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["memory", "tiny"], default="memory")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from benchmarks import measure

        measure.run_and_emit(args.child, lambda: run_child(args.child, Spec.from_json(args.spec)))
        return 0
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory-{report['utc']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"results: {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
