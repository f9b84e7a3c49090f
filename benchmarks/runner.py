"""Run every case in its own fresh process, interleaved over rounds, and report the results.

    python -m benchmarks.runner                     # the cpu preset, 2 rounds, all cases
    python -m benchmarks.runner --preset tiny --rounds 1 --cases matmul_ceiling,train_peft_lora
    python -m benchmarks.runner --compare A.json B.json   # noise between two runs

Each round runs every case once, in an order rotated by one per round: a burst from another
tenant then hits different cases in different rounds instead of one case always. A child
prints one ``BENCH-RESULT`` JSON line; its step times of all rounds are pooled into median,
min and max. Results go to ``<out>/bench-<preset>-<UTC time>.{json,md}`` and to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.measure import RESULT_MARKER
from benchmarks.spec import Spec, preset, with_steps, with_workload

REPO = Path(__file__).resolve().parents[1]
LITGPT_PYTHON = REPO / "benchmarks" / ".venv-litgpt" / "bin" / "python"


@dataclass(frozen=True)
class Case:
    """A case as the runner sees it: its name and the interpreter that runs it."""

    name: str
    module: str  # benchmarks.cases (project venv) or benchmarks.litgpt_case (LitGPT venv)
    needs_litgpt: bool = False
    once: bool = False  # repeats and interleaves inside its own child: first round only


def all_cases() -> list[Case]:
    from benchmarks.cases import CASES, ONCE_PER_RUN

    project = [Case(name, "benchmarks.cases", once=name in ONCE_PER_RUN) for name in CASES]
    return [*project, Case("train_litgpt_adapter_v2", "benchmarks.litgpt_case", needs_litgpt=True)]


def round_order(cases: list[Case], round_index: int) -> list[Case]:
    """Rotate the order by one place per round."""
    shift = round_index % len(cases)
    return cases[shift:] + cases[:shift]


def child_command(case: Case, spec: Spec, litgpt_python: Path) -> list[str]:
    if case.needs_litgpt:
        return [str(litgpt_python), "-m", case.module, "--spec", spec.to_json()]
    return [sys.executable, "-m", case.module, case.name, "--spec", spec.to_json()]


def child_env(spec: Spec) -> dict[str, str]:
    threads = str(spec.workload.threads)
    # The repo first (benchmarks/ is not installed); a caller's PYTHONPATH (wheels carried to a
    # GPU machine) stays behind it.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=path)
    env.setdefault("LAV2_ROOT", str(REPO))
    return env


def parse_result(case: str, completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The child's result line, or a ``failed`` result quoting the end of its stderr."""
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
    return {"case": case, "status": "failed", "reason": f"exit {completed.returncode}, no result: {tail}"}


def run_case(case: Case, spec: Spec, *, litgpt_python: Path, timeout_s: float) -> dict[str, Any]:
    """One fresh child process for one case; wall time includes imports and model building."""
    if case.needs_litgpt and not litgpt_python.is_file():
        return {
            "case": case.name,
            "status": "not available",
            "reason": f"{litgpt_python} missing: `make bench` creates the LitGPT venv",
        }
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            child_command(case, spec, litgpt_python),
            capture_output=True,
            text=True,
            env=child_env(spec),
            cwd=REPO,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"case": case.name, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    result = parse_result(case.name, completed)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def run_rounds(
    cases: list[Case], spec: Spec, rounds: int, *, litgpt_python: Path, timeout_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Every case once per round, order rotated per round; results per case in round order."""
    from rich.progress import Progress

    per_case: dict[str, list[dict[str, Any]]] = {case.name: [] for case in cases}
    with Progress(transient=False) as progress:
        total = sum(1 if case.once else rounds for case in cases)
        task = progress.add_task("benchmark", total=total)
        for round_index in range(rounds):
            for case in round_order(cases, round_index):
                if case.once and round_index > 0:
                    continue
                progress.update(task, description=f"round {round_index + 1}/{rounds}: {case.name}")
                result = run_case(case, spec, litgpt_python=litgpt_python, timeout_s=timeout_s)
                result["round"] = round_index
                result["load_average_1m"] = os.getloadavg()[0]
                per_case[case.name].append(result)
                progress.advance(task)
    return per_case


def select_cases(names: str | None) -> list[Case]:
    cases = all_cases()
    if not names:
        return cases
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = {case.name: case for case in cases}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(known)}")
    return [known[name] for name in wanted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu", choices=["cpu", "tiny", "gpu-7b"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per child (preset default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per child (preset default)")
    parser.add_argument(
        "--workload", action="append", default=[], metavar="KEY=VALUE", help="override a Workload field"
    )
    parser.add_argument("--cases", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: the project's)")
    parser.add_argument("--no-mlflow", action="store_true", help="write JSON and markdown only")
    parser.add_argument("--litgpt-python", type=Path, default=LITGPT_PYTHON)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A", "B"),
        help="print the run-to-run noise between two result JSON files and exit",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(report.noise_markdown(*(json.loads(path.read_text()) for path in args.compare)))
        return 0
    spec = with_workload(with_steps(preset(args.preset), warmup=args.warmup, timed=args.steps), args.workload)
    cases = select_cases(args.cases)
    started = time.time()
    per_case = run_rounds(cases, spec, args.rounds, litgpt_python=args.litgpt_python, timeout_s=args.timeout)
    results = report.build(
        spec, per_case, rounds=args.rounds, started=started, litgpt_python=args.litgpt_python
    )
    json_path, md_path = report.write(results, args.out)
    print(md_path.read_text(encoding="utf-8"))
    if not args.no_mlflow:
        run_id = report.log_to_mlflow(results, [json_path, md_path], tracking_uri=args.tracking_uri)
        print(f"MLflow run {run_id}")
    print(f"results: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
