"""Timing, memory and the result line of one case, inside its child process.

Standard library and torch only: the LitGPT case imports this from its own venv. A child
prints exactly one line starting with ``RESULT_MARKER`` followed by JSON; libraries may print
anything else around it.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

RESULT_MARKER = "BENCH-RESULT "


def configure(threads: int, device: str) -> None:
    """Pin the intra-op thread count (the figure every case shares) and fail early on a missing GPU."""
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch.cuda.is_available() is False")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss, in KiB on Linux).

    The kernel updates its high-water mark lazily, so it can trail an RSS read earlier from
    /proc; every reading this process took counts too, so the peak is never below one of them.
    """
    kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return max(kernel_peak, current_rss_mb(), _highest_read[0])


def rss_after_imports(*modules: str) -> float:
    """Import the case's libraries first, so every case's baseline RSS includes its imports."""
    for name in modules:
        importlib.import_module(name)
    return current_rss_mb()


def current_rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    rss = resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    _highest_read[0] = max(_highest_read[0], rss)
    return rss


_highest_read = [0.0]  # the highest RSS current_rss_mb has read in this process


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], *, warmup: int, timed: int, device: str) -> list[float]:
    """Seconds of each timed call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(timed):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def gpu_peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def emit(result: dict[str, Any]) -> None:
    print(RESULT_MARKER + json.dumps(result), flush=True)


class CaseNotAvailableError(Exception):
    """The case cannot run here (a missing piece of the project or a missing GPU); says why."""


def run_and_emit(case: str, measure: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement and print its result line; a failure becomes a ``failed`` result."""
    try:
        result = {"case": case, "status": "ok", **measure()}
    except CaseNotAvailableError as reason:
        result = {"case": case, "status": "not available", "reason": str(reason)}
    except Exception as err:  # every failure must reach the table with its reason
        traceback.print_exc()
        result = {"case": case, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
    emit(result)


def step_result(
    seconds: list[float],
    *,
    items_per_step: float,
    unit: str,
    flops_per_step: float | None,
    trainable_params: int | None,
    rss_before_model_mb: float,
    device: str,
    **extra: Any,
) -> dict[str, Any]:
    """The fields every timed case reports (the parent aggregates them over rounds)."""
    return {
        "step_seconds": seconds,
        "items_per_step": items_per_step,
        "unit": unit,
        "flops_per_step": flops_per_step,
        "trainable_params": trainable_params,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_model_mb": rss_before_model_mb,
        "gpu_peak_mb": gpu_peak_mb(device),
        "extra": extra,
    }


def training_step(
    params: list[torch.nn.Parameter], compute_loss: Callable[[], torch.Tensor]
) -> Callable[[], float]:
    """One optimiser step of AdamW over ``params``: the same optimiser for every training case.

    ``foreach=True`` for every case (fair): on CPU torch otherwise picks the single-tensor loop,
    whose cost grows with the number of trainable tensors rather than their size, and the
    project's training uses the multi-tensor AdamW too (``train/optim.py``).
    """
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)

    def step() -> float:
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
