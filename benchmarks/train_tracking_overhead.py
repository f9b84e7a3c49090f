"""What MLflow tracking costs a training step: the same run with tracking on and off.

Rounds alternate off/on (the machine's load drifts; STACK.md) and each run trains the given
config for ``--steps`` steps with no evaluation or checkpoint inside the timed steps. A step's
time is the training thread's wall time per step, tracking calls included; the background
sender's CPU use shows up as slower steps. Writes a JSON report next to the other benchmarks.

    .venv/bin/python benchmarks/train_tracking_overhead.py configs/demo.yaml --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import llama_adapter_v2  # noqa: F401 - offline environment first
from llama_adapter_v2.config import load_config
from llama_adapter_v2.train.loop import train


def one_run(config: Path, steps: int, tracked: bool, scratch: Path, index: int) -> float:
    out = scratch / f"run-{index}"
    cfg = load_config(
        config,
        [
            f"training.steps={steps}",
            f"training.output_dir={out}",
            "training.eval_every_steps=100000",
            "training.checkpoint.every_steps=100000",
            "training.checkpoint.keep_best=false",
            f"tracking.enabled={str(tracked).lower()}",
            f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}",
            f"tracking.artifact_root={scratch / 'artifacts'}",
            "tracking.experiment=tracking-overhead",
        ],
    )
    return train(cfg).final_metrics["train/seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/tracking_overhead.json"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as scratch:
        one_run(args.config, 2, True, Path(scratch), -1)  # creates the sqlite store (migrations) untimed
        runs = 0
        for round_index in range(args.rounds):
            for label in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
                seconds = one_run(args.config, args.steps, label == "on", Path(scratch), runs)
                runs += 1
                times[label].append(seconds)
                print(f"round {round_index} tracking {label}: {seconds * 1000:.1f} ms/step", flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    report = {
        "config": str(args.config),
        "steps": args.steps,
        "rounds": args.rounds,
        "seconds_per_step": times,
        "median_off": off,
        "median_on": on,
        "overhead_percent": 100.0 * (on - off) / off,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"median step: {off * 1000:.1f} ms without tracking, {on * 1000:.1f} ms with; "
        f"overhead {report['overhead_percent']:+.2f} %  -> {args.out}"
    )


if __name__ == "__main__":
    main()
