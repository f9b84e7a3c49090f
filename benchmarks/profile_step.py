"""Where a training step's time goes: torch.profiler over a few steps of one training case.

    python -m benchmarks.profile_step train_adapter_v2_language [--preset cpu] [--steps 3]

Prints the top operators by self CPU time, then JSON: the split into GEMM, attention,
loss/softmax, optimizer and the rest (elementwise, copies, reductions), and the memory that
autograd keeps for the backward.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import cases, measure
from benchmarks.spec import preset

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention")
LOSS = ("log_softmax", "nll_loss", "cross_entropy", "aten::_softmax", "aten::softmax")
OPTIMIZER = ("Optimizer.step", "_foreach", "adamw")


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in (
        ("gemm", GEMM),
        ("attention", ATTENTION),
        ("loss_softmax", LOSS),
        ("optimizer", OPTIMIZER),
    ):
        if any(key.lower() in lowered for key in keys):
            return label
    return "other"


def split_by_category(events: Any) -> dict[str, float]:
    """Share of self CPU time per category (self time: nested calls are not counted twice)."""
    totals: Counter[str] = Counter()
    for event in events:
        totals[category(event.key)] += event.self_cpu_time_total
    grand = sum(totals.values()) or 1.0
    return {
        label: totals[label] / grand for label in ("gemm", "attention", "loss_softmax", "optimizer", "other")
    }


def saved_for_backward_mb(compute_loss: Any) -> float:
    """MiB of distinct tensors autograd keeps from the forward for the backward.

    Frozen weights are saved by reference too; they are counted once and are the same for every
    case of one shape, so differences between cases are activation memory.
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    loss.backward()
    return sum(seen.values()) / 2**20


def profile_case(name: str, preset_name: str, steps: int, rows: int) -> dict[str, Any]:
    spec = preset(preset_name)
    measure.configure(spec.workload.threads, spec.workload.device)
    setup = cases.TRAINING_SETUPS[name](spec)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    step = measure.training_step(params, setup.compute_loss)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    return {
        "case": name,
        "preset": preset_name,
        "ms_per_step_profiled": total_ms,
        "saved_for_backward_mb": saved_for_backward_mb(setup.compute_loss),
        **split_by_category(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("case", choices=sorted(cases.TRAINING_SETUPS))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(profile_case(args.case, args.preset, args.steps, args.rows), indent=2))


if __name__ == "__main__":
    main()
