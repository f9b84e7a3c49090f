"""``dvc repro`` of the whole pipeline on a fresh copy of the project.

The copy holds what a clone holds (git-tracked and new files, no outputs, no data); the demo
data is regenerated and must hash to what ``data.dvc`` records. The clone then versions a small
demo data set of its own (``dvc add data``) so that evaluation stays short. The first
``dvc repro`` runs every stage and registers a version; the second runs nothing; changing one
training parameter re-runs train and the stages after it only.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from live_servers import BIN, project_copy, project_env

pytestmark = pytest.mark.slow

# Few steps of everything; the data stays the demo data that data.dvc versions.
SMALL_DATA = {"n_images": 24, "n_instructions": 48, "n_conversations": 12, "n_probe_images": 4}
TINY_TRAINING = {"steps": 4, "batch_size": 2, "eval_every_steps": 2, "log_every_steps": 2,
                 "checkpoint": {"every_steps": 2, "keep_last": 2, "keep_best": True},
                 "demo_base": {"steps": 6, "batch_size": 8}, "demo_clip": {"steps": 6, "batch_size": 8}}
# baseline: the zero-init model's scores depend on data, base and tower, not on training
UPSTREAM_OF_TRAIN = {"prepare", "validate", "shard", "demo-base", "demo-clip", "baseline"}
# `config` snapshots the whole resolved config (nothing depends on it), so any edit re-runs it.
TRAIN_AND_AFTER = {"config", "train", "evaluate", "register"}


def _run(project: Path, env: dict[str, str], *command: str) -> str:
    result = subprocess.run(list(command), cwd=project, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set(config: Path, section: str, **values: object) -> None:
    raw = yaml.safe_load(config.read_text())
    for key, value in values.items():
        node = raw[section]
        if isinstance(value, dict):
            node.setdefault(key, {}).update(value)
        else:
            node[key] = value
    config.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("dvc")
    project = project_copy(base / "project")
    env = project_env(project, base / "prefect-home")
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "clone"]):
        _run(project, env, *command)
    _run(project, env, str(BIN / "lav2"), "data", "demo", "configs/demo.yaml")
    return project, env


def test_dvc_repro_runs_all_then_nothing_then_only_what_a_parameter_touches(
    clone: tuple[Path, dict[str, str]],
) -> None:
    project, env = clone
    dvc = str(BIN / "dvc")
    status = json.loads(_run(project, env, dvc, "status", "--json", "data.dvc"))
    # the regenerated demo data is the version data.dvc records: only absent from this clone's cache
    assert status == {"data.dvc": [{"changed outs": {"data": "not in cache"}}]}
    config = project / "configs" / "demo.yaml"
    _set(config, "data", demo=SMALL_DATA)
    _set(config, "training", **TINY_TRAINING)
    _run(project, env, str(BIN / "lav2"), "data", "demo", "configs/demo.yaml")
    _run(project, env, dvc, "add", "data")

    first = _run(project, env, dvc, "repro")
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert _stages_run(first) == stages
    registry = json.loads((project / "artifacts" / "registry" / "demo.json").read_text())
    assert registry["version"]["version"] == "1"
    # four training steps may or may not beat the zero-init model: the gate says which, with the numbers
    baseline = json.loads((project / "artifacts/train/demo/eval-zero-init/metrics.json").read_text())
    promotion = registry["promotion"]
    assert promotion["baseline_value"] == baseline[promotion["metric"]]
    assert promotion["outcome"] in {"promoted", "refused"}
    numbers = (f"{promotion['metric']} {promotion['challenger_value']:.4g}",
               f"{promotion['baseline_value']:.4g}")
    assert all(number in promotion["reason"] for number in numbers), promotion["reason"]
    assert "zero-init baseline" in promotion["reason"]
    metrics = json.loads(_run(project, env, dvc, "metrics", "show", "--json"))
    shown = metrics[""]["data"]["artifacts/train/demo/eval/metrics.json"]["data"]
    assert shown == json.loads((project / "artifacts/train/demo/eval/metrics.json").read_text())
    trained = metrics[""]["data"]["artifacts/train/demo/train-metrics.json"]["data"]
    assert trained["steps"] == 4 and set(trained) >= {"caption_holdout_loss", "instruction_holdout_loss"}
    _run(project, env, dvc, "plots", "show", "-o", str(project.parent / "plots"))
    page = (project.parent / "plots" / "index.html").read_text()
    assert "loss_per_task.png" in page
    assert "loss_caption_train.csv" in page and "grad_norm_language.csv" in page  # curves as data

    second = _run(project, env, dvc, "repro")
    assert _stages_run(second) == set()

    # a stage that fails has lost its outputs (DVC removes them first); they are in the cache
    adapter = project / "artifacts/train/demo/adapter"
    before = {path.name: path.read_bytes() for path in adapter.iterdir()}
    _set(config, "training", batch_size=0)  # the config check fails inside the stage's command
    failed = subprocess.run([dvc, "repro", "train"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert failed.returncode != 0 and "Running stage 'train'" in failed.stdout + failed.stderr
    assert not adapter.exists()
    _run(project, env, dvc, "checkout", "train")
    assert {path.name: path.read_bytes() for path in adapter.iterdir()} == before
    _set(config, "training", batch_size=TINY_TRAINING["batch_size"])
    assert _stages_run(_run(project, env, dvc, "repro")) == set()  # the previous outputs, as dvc.lock says

    _set(config, "training", steps=6)
    third = _run(project, env, dvc, "repro")
    rerun = _stages_run(third)
    assert {"train", "evaluate", "register"} <= rerun <= TRAIN_AND_AFTER
    assert rerun.isdisjoint(UPSTREAM_OF_TRAIN)
    registry = json.loads((project / "artifacts" / "registry" / "demo.json").read_text())
    assert registry["version"]["version"] == "2"
    assert registry["promotion"]["outcome"] in {"promoted", "kept", "refused"}
