"""Two gloo processes under torchrun against the one-process run with the same global batch.

The loader gives rank r the r-th contiguous slice of each epoch's permutation, so the two runs
see the same data at the same global batch (2 x 2 vs 1 x 4) but not the same samples in each
step: they agree statistically, not step by step. Stated tolerance: held-out loss per task
within 0.1 nats of the one-process run after the same 12 steps, mean training loss within
0.05, the step-0 held-out loss (same model, whole held-out split) within 1e-3.

A job ends, whatever its ranks do: a rank that fails brings the others down (torchrun), and a
job that outlives its time limit is killed with every rank under it (torchrun starts each rank
in its own session, so killing torchrun alone would leave them behind).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from tiny_project import ONE_PROCESS_HOLDOUT, PINNED_LOSSES, TINY_STEPS

HERE = Path(__file__).resolve().parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAV2 = str(Path(sys.executable).with_name("lav2"))
JOB_LIMIT_S = 300  # the job takes about 30 s on 2 busy cores


def _two_process_train(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`lav2 train` with LAV2_GPUS=2 (what a gpu-pool worker's job variables set); it relaunches
    itself as `torchrun --standalone --nproc-per-node=2 --no-python lav2 train ...`."""
    command = [LAV2, "train", str(config), "--set", f"training.output_dir={out}",
               "--set", "training.batch_size=2", *(arg for o in overrides for arg in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAV2_GPUS": "2",
           "PATH": f"{Path(TORCHRUN).parent}{os.pathsep}{os.environ['PATH']}"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = job.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        ranks = psutil.Process(job.pid).children(recursive=True)
        for process in [*ranks, psutil.Process(job.pid)]:
            process.kill()
        stdout, stderr = job.communicate()
        pytest.fail(f"the job ran past {JOB_LIMIT_S} s; killed with its {len(ranks)} ranks:\n"
                    f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    tiny_project: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    finished = _two_process_train(tiny_project, out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "--nproc-per-node=2" in finished.stderr  # the relaunch, announced
    state = json.loads((out / "checkpoints" / f"step-{TINY_STEPS:07d}" / "state.json").read_text())
    assert state["world_size"] == 2
    losses = [loss for _, _, loss in state["history"]["loss"]]
    assert len(losses) == TINY_STEPS
    assert sum(losses) / len(losses) == pytest.approx(sum(PINNED_LOSSES) / len(PINNED_LOSSES), abs=0.05)
    holdout = {(step, task): loss for step, task, loss in state["history"]["holdout"]}
    for task, (initial, final) in ONE_PROCESS_HOLDOUT.items():
        assert holdout[(0, task)] == pytest.approx(initial, abs=1e-3)
        assert holdout[(TINY_STEPS, task)] == pytest.approx(final, abs=0.1)
    assert holdout[(TINY_STEPS, "caption")] < holdout[(0, "caption")] - 0.3


def test_a_rank_that_fails_ends_the_whole_job_with_its_error(tiny_project: Path, tmp_path: Path) -> None:
    """Rank 0 fails at its first checkpoint (step 4) while rank 1 goes on to step 5's collectives:
    the job must end with rank 0's error, not leave rank 1 waiting."""
    out = tmp_path / "ddp"
    out.mkdir()
    (out / "checkpoints").write_text("a file where rank 0 writes its checkpoints\n")
    finished = _two_process_train(tiny_project, out)
    assert finished.returncode != 0
    assert "File exists" in finished.stderr  # rank 0's own error, printed by `lav2 train`
    summary = finished.stderr[-3000:]
    assert "ChildFailedError" in finished.stderr and "exitcode  : 3" in finished.stderr, summary
    assert not (out / "adapter").exists()


def test_no_ddp_module_outlives_the_process_group(tiny_project: Path, tmp_path: Path) -> None:
    """Train's teardown order, on every rank: the DDP module (whose reducer holds the process group
    from C++) is gone before the group is destroyed; it used to die after, which deadlocked rank 1
    about one run in four on a busy machine (distributed.shutdown says how)."""
    command = [TORCHRUN, "--standalone", "--nproc-per-node=2", str(HERE / "teardown_order.py"),
               str(tiny_project), str(tmp_path / "ddp")]
    pythonpath = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    finished = subprocess.run(command, capture_output=True, text=True, timeout=JOB_LIMIT_S, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath})
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DDP modules alive at shutdown: 0" in finished.stdout, finished.stdout
