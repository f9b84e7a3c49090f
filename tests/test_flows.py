"""dvc.yaml as the flow reads it, the overrides it writes, dvc.lock, the torchrun launch and prefect.yaml,
without a Prefect server (the live runs are in test_orchestration and test_pools)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from llama_adapter_v2.cli.train_cmd import torchrun_command, training_processes
from llama_adapter_v2.config import load_config
from llama_adapter_v2.stages import (
    lock_entries,
    merge_lock,
    pipeline_config,
    pool_groups,
    read_stages,
    upstream_of,
    write_overrides,
)

DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def flows(repo_root: Path) -> ModuleType:
    """flows/pipeline.py loaded by path, as a Prefect worker loads a deployment entrypoint."""
    spec = importlib.util.spec_from_file_location("lav2_pipeline_flows", repo_root / "flows" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_parameter_dvc_yaml_lists_is_written_in_the_shipped_config(repo_root: Path) -> None:
    """DVC reads params from the file as written (not the schema's defaults): a missing one stops
    `dvc repro` after it has removed the stage's outputs."""
    written = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    missing = []
    for stage in read_stages(repo_root / "dvc.yaml").values():
        for name in stage.params:
            node = written
            for part in name.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                missing.append(f"{stage.name}: {name}")
    assert not missing


def test_dvc_yaml_is_the_stage_list_of_the_flow(flows: ModuleType, repo_root: Path) -> None:
    stages = read_stages(repo_root / "dvc.yaml")
    assert pool_groups(stages) == [
        ("cpu", ["config", "prepare", "validate", "shard"]),
        ("gpu", ["demo-base", "demo-clip", "baseline", "train", "evaluate", "register"]),
    ]
    assert pipeline_config(stages) == "configs/demo.yaml"
    assert stages["train"].upstream == ("shard", "demo-base", "demo-clip")
    assert stages["evaluate"].upstream == ("shard", "demo-base", "demo-clip", "train")
    assert stages["prepare"].params == ("data.captions", "data.instructions") and stages["prepare"].reads_data
    assert not stages["train"].reads_data  # it reads the shards, which read the data
    # what a gpu worker pulls before its stages: the cpu group's outputs it reads
    assert upstream_of(stages, pool_groups(stages)[1][1]) == ["shard"]
    # the flow runs no config but dvc.yaml's
    assert flows._checked_config("configs/demo.yaml", stages) == "configs/demo.yaml"
    with pytest.raises(ValueError, match=r"dvc\.yaml's stages read configs/demo\.yaml"):
        flows._checked_config("configs/llama2-7b.yaml", stages)


def test_overrides_are_written_into_the_config_with_its_comments(repo_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "configs" / "demo.yaml"
    config.parent.mkdir()
    shutil.copy(repo_root / "configs" / "demo.yaml", config)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the project root of the copy
    original = config.read_text()
    assert not write_overrides(config, [])
    assert write_overrides(config, ["training.steps=7", "tracking.promotion.guards={}"])
    written = config.read_text()
    assert "# written by the demo-base stage of dvc.yaml" in written  # comments kept
    cfg = load_config(config)
    assert cfg.training.steps == 7 and cfg.tracking.promotion.guards == {}
    assert not write_overrides(config, ["training.steps=7"])  # the same value again: file unchanged
    changed = [line for line in written.splitlines() if line not in original.splitlines()]
    assert len(changed) == 2, changed


def test_lock_entries_move_between_checkouts(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    entry = {"cmd": "lav2 data shard configs/demo.yaml", "outs": [{"path": "artifacts/data/shards",
                                                                   "md5": "0" * 32 + ".dir"}]}
    recorded = {"schema": "2.0", "stages": {"shard": entry, "prepare": {}}}
    (first / "dvc.lock").write_text(yaml.safe_dump(recorded))
    moved = lock_entries(first, ["shard", "train"])  # train never ran there
    assert moved == {"shard": entry}
    merge_lock(second, moved)
    assert yaml.safe_load((second / "dvc.lock").read_text()) == {"schema": "2.0", "stages": {"shard": entry}}


def _changed(node: object, path: str = "") -> list[str]:
    """Every dependency or parameter that ``dvc status`` reports as other than deleted."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in _changed(value, f"{path}/{key}")]
    if isinstance(node, list):
        return [found for item in node for found in _changed(item, path)]
    return [] if node == "deleted" else [f"{path}: {node}"]


def test_committed_dvc_lock_matches_the_code_and_config(repo_root: Path) -> None:
    """dvc.lock is regenerated by `dvc repro` (or `make demo`) and committed. It must record the
    hashes of the code, the config parameters and the data the tree holds; outputs and the data
    themselves are absent from a clone (deleted, not changed)."""
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(read_stages(repo_root / "dvc.yaml"))
    data = yaml.safe_load((repo_root / "data.dvc").read_text())["outs"][0]["md5"]
    for name, entry in lock.items():
        for dep in entry.get("deps", []):
            if dep["path"] == "data":
                assert dep["md5"] == data, f"{name}: dvc.lock's data is not data.dvc's"
    status = subprocess.run([DVC, "status", "--json"], cwd=repo_root, capture_output=True, text=True,
                            check=True, timeout=120).stdout
    stale = []
    for stage, changes in json.loads(status).items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                stale.append(f"{stage}: {change}")
            elif "changed deps" in change:
                deps = {path: what for path, what in change["changed deps"].items()
                        if not path.startswith(("artifacts/", "data"))}
                stale += [f"{stage}{found}" for found in _changed(deps)]
    advice = "dvc.lock is stale: run `dvc repro` (or `make demo`) and commit dvc.lock"
    assert not stale, "\n".join([advice, *stale])


def test_training_relaunches_under_torchrun_with_the_configured_processes(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAV2_GPUS", raising=False)
    eight = load_config(repo_root / "configs" / "llama2-7b.yaml", ["training.device=cuda"])
    assert eight.orchestration.gpu_pool.gpus == 8
    assert training_processes(eight, visible_gpus=8) == 8
    assert training_processes(eight, visible_gpus=1) == 1  # a laptop: no 8-process launch
    demo = load_config(repo_root / "configs" / "demo.yaml")
    assert training_processes(demo, visible_gpus=8) == 1  # the demo asks for one
    monkeypatch.setenv("LAV2_GPUS", "2")  # the work pool's job variables win
    assert training_processes(demo, visible_gpus=0) == 2
    command = torchrun_command(["train", "configs/demo.yaml", "--set", "training.steps=5"], 4)
    assert Path(command[0]).name == "torchrun" and Path(command[4]).name == "lav2"
    assert command[1:4] == ["--standalone", "--nproc-per-node=4", "--no-python"]
    assert command[5:] == ["train", "configs/demo.yaml", "--set", "training.steps=5"]


def test_prefect_yaml_deployments(repo_root: Path, flows: ModuleType) -> None:
    spec = yaml.safe_load((repo_root / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"demo-cpu", "demo-pools", "stages-cpu", "stages-gpu", "stages-gpu-docker",
                                "serve-champion"}
    for deployment in deployments.values():
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (repo_root / path).read_text()
    stages = read_stages(repo_root / "dvc.yaml")
    # every pool of dvc.yaml has a stages deployment on a pool of that name
    targets = deployments["demo-pools"]["parameters"]["deployments"]
    assert set(targets) == {stage.pool for stage in stages.values()}
    for pool, target in targets.items():
        flow_name, _, deployment_name = target.partition("/")
        assert flow_name == flows.dvc_stages.name
        assert deployments[deployment_name]["work_pool"]["name"] == pool
    serving = deployments["serve-champion"]
    assert serving["work_pool"]["name"] == "gpu" and serving["parameters"]["host"] == "127.0.0.1"
    cpu = deployments["demo-cpu"]["work_pool"]
    assert cpu["name"] == "cpu" and cpu["job_variables"]["env"]["LAV2_GPUS"] == "0"
    docker = deployments["stages-gpu-docker"]["work_pool"]["job_variables"]
    [request] = docker["container_create_kwargs"]["device_requests"]
    assert docker["image"] and docker["gpus"] == request["count"] == int(docker["env"]["LAV2_GPUS"]) == 8
