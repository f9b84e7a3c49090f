"""``dvc plots diff`` overlays two revisions' training curves, as dvc.yaml declares them.

A tiny git + DVC repository holds the train stage with the plots section of the project's own
``dvc.yaml`` (copied, so a broken declaration fails here) and two commits of curves written by the
train stage's own writers (``write_curves``, ``draw_all``) from two different histories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_adapter_v2.train.plots import draw_all, write_curves

BIN = Path(sys.executable).parent
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "plots", "GIT_AUTHOR_EMAIL": "plots@127.0.0.1",
                "GIT_COMMITTER_NAME": "plots", "GIT_COMMITTER_EMAIL": "plots@127.0.0.1"}
TASKS = ("caption", "instruction")
GROUPS = ("visual", "language")


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, **GIT_IDENTITY, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def history(scale: float) -> dict[str, list[Any]]:
    """A training history as the loop keeps it: (step, name, value) per curve; ``scale`` sets the run."""
    steps = range(1, 6)
    return {
        "loss": [(s, task, round(scale * (3.0 - 0.25 * s), 4)) for s in steps for task in TASKS],
        "holdout": [(s, task, round(scale * (3.1 - 0.2 * s), 4)) for s in (0, 3, 5) for task in TASKS],
        "grad_norm": [(s, group, round(scale * 0.5 / s, 4)) for s in steps for group in GROUPS],
        "gates": [(s, {"layer 0": 0.1 * s}) for s in steps],
    }


def train_plots(repo_root: Path) -> list[dict[str, Any]]:
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["train"]["plots"]


@pytest.mark.slow
def test_plots_diff_overlays_both_revisions_loss_curves(repo_root: Path, tmp_path: Path) -> None:
    plots = train_plots(repo_root)
    folders = {Path(next(iter(entry))).parent for entry in plots}
    assert len(folders) == 1, f"the train stage's plots are in one folder, not {folders}"
    folder = folders.pop()
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run([str(BIN / "dvc"), "init", "-q"], repo)
    stage = {"cmd": "lav2 train configs/demo.yaml", "plots": plots}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False))
    for revision, scale in (("first", 1.0), ("second", 0.5)):
        write_curves(history(scale), repo / folder)
        draw_all(history(scale), repo / folder)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", f"{revision} training"], repo)

    shown = json.loads(run([str(BIN / "dvc"), "plots", "diff", "HEAD~1", "HEAD", "--json"], repo))
    errors = shown.get("errors")
    assert not errors, errors
    for task in TASKS:
        for split in ("train", "holdout"):
            path = (folder / f"loss_{task}_{split}.csv").as_posix()
            [plot] = shown["data"][path]
            assert plot["type"] == "vega" and plot["content"]["encoding"]["x"]["field"] == "step"
            points = plot["content"]["data"]["values"]
            by_revision: dict[str, list[tuple[int, float]]] = {}
            for point in points:
                by_revision.setdefault(point["rev"], []).append((int(point["step"]), float(point["loss"])))
            assert set(by_revision) == {"HEAD~1", "HEAD"}, path
            first, second = (sorted(by_revision[rev]) for rev in ("HEAD~1", "HEAD"))
            assert [s for s, _ in first] == [s for s, _ in second]
            # the two curves are the two runs' own: the second is the first at half the loss
            assert [loss for _, loss in second] == pytest.approx([loss / 2 for _, loss in first], rel=1e-3)
