"""The training engine's GPU path on a 7B-shaped random base, measured step by step.

    python -m benchmarks.gpu_train_path --preset gpu-7b                 # CUDA, bf16 autocast
    python -m benchmarks.gpu_train_path --preset gpu-7b --frozen-dtype float32   # the old storage
    python -m benchmarks.gpu_train_path --preset tiny --device cpu      # what the tests run

It runs what ``train.step.train_step`` runs, minus the data loader: the project's model built in
the precision's storage dtype with fp32 trainables, ``LossOf``, the per-group AdamW with its
schedule and clipping, and ``Precision.autocast``, alternating caption steps (visual group,
images) and instruction steps (language group, text). It prints one ``BENCH-RESULT`` line:
median step seconds and tokens/s per task, peak accelerator memory, the losses, and whether
the untrained group stayed bit-for-bit unchanged after each kind of step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks import batches, measure
from benchmarks.cases import project_config
from benchmarks.spec import Spec, preset, with_workload
from llama_adapter_v2.train.schedule import GROUP_OF_TASK


def build(spec: Spec, frozen_dtype: torch.dtype | None, steps: int) -> tuple[Any, Any, dict[str, Any]]:
    """Model, loss wrapper and per-group optimisers exactly as the trainer makes them."""
    from llama_adapter_v2.model.build import build_model
    from llama_adapter_v2.train.optim import Precision, build_group_optimizer, keep_trainable_in_fp32
    from llama_adapter_v2.train.trainer import LossOf

    cfg = project_config(spec, visual=True)
    precision = Precision(spec.workload.device, "bf16")
    model = build_model(cfg, device=spec.workload.device, dtype=frozen_dtype or precision.frozen_dtype)
    declared = model.adapter_parameters()
    keep_trainable_in_fp32(declared)
    optimisers = {
        name: build_group_optimizer(name, [p for p in declared if p.trainable.group == name],
                                    getattr(cfg.training, name), cfg.training, total_steps=steps)
        for name in ("visual", "language")
    }
    return model, LossOf(model), {"precision": precision, "optimisers": optimisers}


def snapshot(model: Any, group: str) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in model.parameter_groups()[group]]


def unchanged(model: Any, group: str, before: list[torch.Tensor]) -> bool:
    now = [p for _, p in model.parameter_groups()[group]]
    return all(torch.equal(a, b) for a, b in zip(before, now, strict=True))


def run(spec: Spec, frozen_dtype: torch.dtype | None) -> dict[str, Any]:
    work = spec.workload
    measure.configure(work.threads, work.device)
    total = work.warmup_steps + work.timed_steps
    model, loss_of, parts = build(spec, frozen_dtype, 2 * total)
    model_mb = measure.gpu_peak_mb(work.device)
    text = batches.text_batch(spec)
    images = batches.image_batch(spec, torch.float32)
    seconds: dict[str, list[float]] = {"caption": [], "instruction": []}
    losses: dict[str, list[float]] = {"caption": [], "instruction": []}
    disjoint: dict[str, bool] = {}
    for index in range(2 * total):
        task = "caption" if index % 2 == 0 else "instruction"
        group, other = GROUP_OF_TASK[task], GROUP_OF_TASK["instruction" if task == "caption" else "caption"]
        before = snapshot(model, other) if index < 2 else []
        measure.synchronize(work.device)
        start = time.perf_counter()
        model.set_trainable([group])
        loss_of.train()
        with parts["precision"].autocast():
            loss = loss_of(text["input_ids"], text["attention_mask"], text["labels"],
                           images if task == "caption" else None)
        loss.backward()
        parts["optimisers"][group].step(None)
        parts["optimisers"][group].zero_grad()
        measure.synchronize(work.device)
        if index >= 2 * work.warmup_steps:
            seconds[task].append(time.perf_counter() - start)
        losses[task].append(float(loss.detach()))
        if before:
            disjoint[task] = unchanged(model, other, before)
    return {
        "frozen_dtype": str(next(model.base.parameters()).dtype),
        "trainable_dtypes": sorted({str(p.dtype) for g in model.parameter_groups().values() for _, p in g}),
        "median_step_seconds": {task: statistics.median(s) for task, s in seconds.items()},
        "tokens_per_s": {task: work.tokens_per_step / statistics.median(s) for task, s in seconds.items()},
        "model_gpu_mb": model_mb,
        "gpu_peak_mb": measure.gpu_peak_mb(work.device),
        "peak_rss_mb": measure.peak_rss_mb(),
        "losses": losses,
        "other_group_unchanged": disjoint,
        "device_name": torch.cuda.get_device_name() if work.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="gpu-7b", choices=["cpu", "tiny", "gpu-7b"])
    parser.add_argument("--workload", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--frozen-dtype", choices=["float32", "bfloat16"], default=None,
                        help="override the storage dtype of the frozen base (default: the precision's)")
    args = parser.parse_args(argv)
    spec = with_workload(preset(args.preset), args.workload)
    dtype = measure.torch_dtype(args.frozen_dtype) if args.frozen_dtype else None
    measure.run_and_emit("gpu_train_path", lambda: run(spec, dtype))


if __name__ == "__main__":
    main()
