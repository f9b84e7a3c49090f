"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends.

Real subprocesses and a real kill: ``lav2 train`` is started, SIGKILLed once two checkpoints
are complete, the newest checkpoint is then truncated (as a crash during a copy would leave
it), and ``lav2 train --resume`` must skip it by name, resume from the one before, and end
with the uninterrupted run's adapter weights bit for bit (CPU, fp32) and its loss curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_project import tiny_config

from llama_adapter_v2.train.loop import train

STEPS = 30
OVERRIDES = [f"training.steps={STEPS}", "training.checkpoint.every_steps=5",
             "training.checkpoint.keep_last=3", "training.eval_every_steps=100",
             "training.checkpoint.keep_best=false"]
LAV2 = str(Path(sys.executable).with_name("lav2"))


def _lav2_train(config: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for item in [*OVERRIDES, f"training.output_dir={out}"] for arg in ("--set", item)]
    return [LAV2, "train", str(config), *sets, *extra]


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert process.poll() is None, f"training ended (rc {process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout_s}s"
        time.sleep(0.02)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tiny_project: Path, tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_lav2_train(tiny_project, killed_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(killed_dir / "checkpoints" / "step-0000010" / "MANIFEST.json", process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    kept = sorted(p.name for p in (killed_dir / "checkpoints").glob("step-*"))
    assert f"step-{STEPS:07d}" not in kept, f"the kill came too late: {kept}"
    newest = killed_dir / "checkpoints" / kept[-1]
    weights = newest / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    resumed = subprocess.run(_lav2_train(tiny_project, killed_dir, "--resume"), capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping damaged checkpoint {newest}" in resumed.stderr
    assert "truncated" in resumed.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses ran with one thread: same kernels, same bits
    try:
        reference = train(tiny_config(tiny_project, tmp_path / "straight", *OVERRIDES))
    finally:
        torch.set_num_threads(threads)
    final_state = json.loads((killed_dir / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())
    assert [tuple(row) for row in final_state["history"]["loss"]] == reference.losses
    ours = load_file(str(killed_dir / "adapter" / "adapter.safetensors"))
    theirs = load_file(str(reference.adapter_dir / "adapter.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
