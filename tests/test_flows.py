"""Flow helpers and prefect.yaml, without a Prefect server (the live run is in test_orchestration)."""

from __future__ import annotations

import errno
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from prefect.states import Completed, Failed

from llama_adapter_v2.config import Config, load_config
from llama_adapter_v2.stages import read_stages, stage_key, training_identity


@pytest.fixture(scope="module")
def flows(repo_root: Path) -> ModuleType:
    """flows/pipeline.py loaded by path, as a Prefect worker loads a deployment entrypoint."""
    spec = importlib.util.spec_from_file_location("lav2_pipeline_flows", repo_root / "flows" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cache_keys_follow_the_parameters_dvc_yaml_lists(repo_root: Path) -> None:
    config = repo_root / "configs" / "demo.yaml"
    base = load_config(config)
    more_steps = load_config(config, ["training.steps=7"])
    other_data = load_config(config, ["data.demo.n_images=12"])
    other_holdout = load_config(config, ["data.holdout_fraction=0.2"])
    other_store = load_config(config, ["tracking.uri=http://127.0.0.1:5000"])
    stages = ("demo-data", "prepare", "validate", "shard", "demo-base", "demo-clip", "train", "evaluate")
    keys = {stage: stage_key(stage, base, "abc") for stage in stages}
    assert len(set(keys.values())) == len(stages)
    assert all(key is not None and key.startswith(f"lav2-{stage}-abc-") for stage, key in keys.items())

    def changed(cfg: Config) -> set[str]:
        return {stage for stage in stages if stage_key(stage, cfg, "abc") != keys[stage]}

    assert changed(more_steps) == {"train", "evaluate"}  # training: train's param, evaluate downstream
    assert changed(other_data) == set(stages)  # the demo data feeds every stage
    # dvc.yaml: shard, demo-base and demo-clip list data.holdout_fraction; train and evaluate follow
    assert changed(other_holdout) == {"shard", "demo-base", "demo-clip", "train", "evaluate"}
    # training's result names a run in the store; the data stages' results are the same in any store
    assert changed(other_store) == {"train", "evaluate"}
    assert {stage_key(stage, base, "def") for stage in stages}.isdisjoint(keys.values())
    assert stage_key("train", base, "untracked") is None  # no data version: never cached


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
    assert set(flows.TASK_OF_STAGE) == set(stages) - {"config"}
    assert stages["train"].upstream == ("shard", "demo-base", "demo-clip")
    assert stages["evaluate"].upstream == ("shard", "demo-base", "demo-clip", "train")
    assert stages["prepare"].params == ("data.captions", "data.instructions") and stages["prepare"].reads_data
    assert not stages["train"].reads_data  # it reads the shards, which read the data


def test_multi_gpu_training_launches_torchrun(flows: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    command = flows.torchrun_command("configs/demo.yaml", ["training.steps=5"], 4)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node=4", "--no-python"]
    assert Path(command[4]).name == "lav2"
    assert command[5:] == ["train", "configs/demo.yaml", "--resume", "--set", "training.steps=5"]
    monkeypatch.setenv("LAV2_GPUS", "4")
    assert flows.gpu_count() == 4


def test_only_transient_failures_are_retried(flows: ModuleType) -> None:
    assert flows.retry_only_transient(None, None, Failed(data=ConnectionResetError("peer went away")))
    assert flows.retry_only_transient(None, None, Failed(data=OSError(errno.EIO, "disk hiccup")))
    assert flows.retry_only_transient(None, None, Failed(data=TimeoutError("slow server")))
    assert not flows.retry_only_transient(None, None, Failed(data=FileNotFoundError(2, "no adapter")))
    assert not flows.retry_only_transient(None, None, Failed(data=FloatingPointError("loss became nan")))
    assert not flows.retry_only_transient(None, None, Failed(data=ValueError("bad config")))
    assert not flows.retry_only_transient(None, None, Completed(data=1))


def test_prefect_yaml_deployments(repo_root: Path) -> None:
    spec = yaml.safe_load((repo_root / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"demo-cpu", "train-gpu", "serve-champion"}
    for deployment in deployments.values():
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (repo_root / path).read_text()
        assert (repo_root / deployment["parameters"]["config_path"]).is_file()
    cpu = deployments["demo-cpu"]["work_pool"]
    assert cpu["name"] == "cpu" and cpu["job_variables"]["env"]["LAV2_GPUS"] == "0"
    gpu = deployments["train-gpu"]["work_pool"]
    variables = gpu["job_variables"]
    [request] = variables["container_create_kwargs"]["device_requests"]
    assert gpu["name"] == "gpu" and variables["image"]
    assert variables["gpus"] == request["count"] == int(variables["env"]["LAV2_GPUS"]) == 8


def test_checkpoints_of_another_training_are_never_resumed(flows: ModuleType, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints" / "step-0000002"
    checkpoints.mkdir(parents=True)
    (checkpoints / "MANIFEST.json").write_text("{}")
    assert flows.claim_checkpoints(tmp_path, "first") == "unknown"  # unrecorded: not trusted
    assert not (tmp_path / "checkpoints").exists()

    checkpoints.mkdir(parents=True)
    assert flows.claim_checkpoints(tmp_path, "first") is None  # a retry of the same training resumes
    assert checkpoints.is_dir()
    assert flows.claim_checkpoints(tmp_path, "second") == "first"  # changed config or tracking store
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / flows.IDENTITY_FILE).read_text() == "second"


def test_training_identity_changes_with_training_inputs_only(repo_root: Path) -> None:
    config = repo_root / "configs" / "demo.yaml"
    base = training_identity(load_config(config), "abc")
    assert training_identity(load_config(config), "abc") == base
    assert training_identity(load_config(config, ["training.steps=7"]), "abc") != base
    assert training_identity(load_config(config, ["tracking.uri=http://127.0.0.1:5000"]), "abc") != base
    assert training_identity(load_config(config), "def") != base
    assert training_identity(load_config(config, ["tracking.promotion.margin=0.5"]), "abc") == base
