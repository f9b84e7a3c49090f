"""MLflow tracking: everything a run records, fail-fast on a dead server, nothing lost mid-run.

All against real MLflow: a sqlite store, and an ``mlflow server`` on 127.0.0.1 that the test
kills during a run (a real training subprocess) and restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_servers import free_port, start, stop, wait_healthy
from mlflow import MlflowClient
from tiny_project import TINY_STEPS, tiny_config

from llama_adapter_v2.store import TrackingUnavailableError
from llama_adapter_v2.train.loop import train
from llama_adapter_v2.train.schedule import task_schedule
from llama_adapter_v2.train.tracking import sync_spills

LAV2 = str(Path(sys.executable).with_name("lav2"))


def test_an_unreachable_server_fails_the_run_at_start(tiny_project: Path, tmp_path: Path) -> None:
    port = free_port()  # bound and released: nothing listens there
    cfg = tiny_config(tiny_project, tmp_path / "run", "tracking.enabled=true",
                      f"tracking.uri=http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"http://127.0.0.1:{port} is unreachable"):
        train(cfg)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_a_run_records_params_tags_metrics_and_artifacts(tiny_project: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(tiny_project, tmp_path / "run", "tracking.enabled=true", f"tracking.uri={uri}",
                      f"tracking.artifact_root={tmp_path / 'artifacts'}")
    result = train(cfg)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.steps"] == str(TINY_STEPS)
    assert run.data.params["model.adapter.prompt_len"] == "3"
    assert {"git_commit", "data_dvc_md5", "base_model", "base_config_sha256"} <= run.data.tags.keys()
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40  # MLflow's own field, shown in its UI
    assert run.data.tags["mlflow.source.name"] == "lav2 train"
    inputs = {(d.dataset.name, d.tags[0].value): json.loads(d.dataset.profile)["num_rows"]
              for d in run.inputs.dataset_inputs}
    shards = Path(cfg.data.work_dir) / "shards"
    assert inputs == {
        (f"tiny-train-{task}-{split}", "training" if split == "train" else "evaluation"):
            json.loads((shards / task / split / "index.json").read_text())["count"]
        for task in ("caption", "instruction") for split in ("train", "holdout")
    }
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts" / "tiny-train").as_uri())
    tasks = task_schedule(cfg.training)
    for task, group in (("caption", "visual"), ("instruction", "language")):
        expected = [step + 1 for step, t in enumerate(tasks) if t == task]
        for key in (f"loss/{task}", f"lr/{group}", f"grad_norm/{group}"):
            assert [m.step for m in client.get_metric_history(result.run_id, key)] == expected, key
        held_out = client.get_metric_history(result.run_id, f"holdout/{task}")
        assert [m.step for m in held_out] == [0, 4, 6, 8, 12]
    every_step = list(range(1, TINY_STEPS + 1))
    for key in ("tokens_per_s", "gate/layer_00_visual", "gate/layer_01_adaptation"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == every_step, key
    measured = [m.step for m in client.get_metric_history(result.run_id, "update_ratio/visual")]
    assert set(measured) <= {3, 6, 9, 12} and measured
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "parameters.json", "adapter", "checkpoints"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/loss_per_task.png", "plots/gate_magnitude.png", "plots/grad_norm_per_group.png"}
    assert 0 < result.final_metrics["tracking/overhead_fraction"] < 1
    curve = (tmp_path / "run" / "plots" / "loss_caption_train.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) - 1 == tasks.count("caption")
    trained = json.loads((tmp_path / "run" / "train-metrics.json").read_text())
    assert trained["steps"] == TINY_STEPS
    assert trained["caption_holdout_loss"] == result.final_metrics["holdout/caption"]
    for group in ("visual", "language"):  # the share of the group's steps whose gradient was clipped
        norms = [m.value for m in client.get_metric_history(result.run_id, f"grad_norm/{group}")]
        clipped = sum(norm > cfg.training.grad_clip for norm in norms) / len(norms)
        assert trained[f"{group}_clipped_fraction"] == pytest.approx(clipped)
        assert run_metric(client, result.run_id, f"clipped_fraction/{group}") == pytest.approx(clipped)


def run_metric(client: MlflowClient, run_id: str, key: str) -> float:
    return client.get_run(run_id).data.metrics[key]


def _mlflow_server(port: int, store: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port),
               "--backend-store-uri", f"sqlite:///{store / 'server.db'}",
               "--artifacts-destination", str(store / "artifacts"), "--workers", "1"]
    process = start(command, os.environ, log, store)
    wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return process


def test_a_server_lost_mid_run_loses_no_metric(tiny_project: Path, tmp_path: Path) -> None:
    steps, port, store = 60, free_port(), tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    overrides = [f"training.steps={steps}", "training.log_every_steps=2", "training.eval_every_steps=1000",
                 "training.checkpoint.every_steps=1000", "tracking.enabled=true", f"tracking.uri={uri}",
                 "tracking.experiment=lost-server", f"training.output_dir={tmp_path / 'run'}"]
    server = _mlflow_server(port, store, tmp_path / "server-1.log")
    client = MlflowClient(tracking_uri=uri)
    training = subprocess.Popen(
        [LAV2, "train", str(tiny_project), *[a for o in overrides for a in ("--set", o)]],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "train.log").open("wb"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        run_id = _first_run_with_metrics(client, "lost-server", training)
        stop(server)  # the server dies mid-run
        spills = list((tmp_path / "run" / "tracking").glob("spill-*.jsonl"))
        deadline = time.monotonic() + 300
        while not spills and training.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            spills = list((tmp_path / "run" / "tracking").glob("spill-*.jsonl"))
        assert spills, "no record was spilled while the server was down"
        server = _mlflow_server(port, store, tmp_path / "server-2.log")
        assert training.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
        cfg = tiny_config(tiny_project, tmp_path / "run", *overrides)
        sync_spills(cfg)  # what `lav2 sync-metrics` does; a no-op if the run delivered everything itself
        keys = ("tokens_per_s", "loss/caption", "loss/instruction", "lr/visual", "lr/language")
        history = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in keys}
        tasks = task_schedule(cfg.training)
        assert history["tokens_per_s"] == list(range(1, steps + 1))
        for task, group in (("caption", "visual"), ("instruction", "language")):
            expected = [step + 1 for step, t in enumerate(tasks) if t == task]
            assert history[f"loss/{task}"] == expected and history[f"lr/{group}"] == expected
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not list((tmp_path / "run" / "tracking").glob("spill-*.jsonl"))
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
        stop(server)


def _first_run_with_metrics(client: object, experiment: str, training: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert training.poll() is None, "training ended before any metric reached the server"
        found = client.get_experiment_by_name(experiment)  # type: ignore[attr-defined]
        if found is not None:
            for run in client.search_runs([found.experiment_id]):  # type: ignore[attr-defined]
                if run.data.metrics.get("tokens_per_s") is not None:
                    return str(run.info.run_id)
        time.sleep(0.2)
    raise TimeoutError("no metric reached the server")
