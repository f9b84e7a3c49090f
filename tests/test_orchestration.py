"""The pipeline as a Prefect deployment on a real server and worker, then served by MLflow.

One copy of the project (as a fresh clone holds it) and one tiny pipeline run are shared by
the tests of this module: a real ``prefect server`` on 127.0.0.1, the ``cpu`` process pool,
``prefect deploy`` from prefect.yaml, a process worker, the ``demo-cpu`` deployment run with
overrides for a few steps. The flow runs dvc.yaml's stages through DVC (the overrides written
into the copy's config), so a second run reruns no stage. The registered champion is then
served by ``mlflow models serve``. Two pools, an MLflow server and a lost worker are
test_pools.py's. Everything started here is stopped here.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from live_servers import BIN, free_port, project_copy, project_env, start, stop, wait_healthy
from mlflow import MlflowClient
from PIL import Image

pytestmark = pytest.mark.slow

# A few steps of everything: the point is the orchestration, not the model.
TINY = [
    "data.demo.n_images=24", "data.demo.n_instructions=48", "data.demo.n_conversations=12",
    "data.demo.n_probe_images=4", "training.demo_clip.steps=6", "training.demo_clip.batch_size=8",
    "data.shards.samples_per_shard=32",
    "training.demo_base.steps=6", "training.demo_base.batch_size=8",
    "training.steps=4", "training.batch_size=2", "training.checkpoint.every_steps=2",
    "training.eval_every_steps=2", "training.log_every_steps=2", "tracking.system_metrics=false",
    # four steps cannot beat the zero-init model: the gate compares with the champion alone here
    "tracking.promotion.beat_baseline=false", "tracking.promotion.guards={}",
]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    logs: Path

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(command), cwd=self.root, env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result


def _api(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("orchestration")
    root = project_copy(base / "project")
    project = Project(root, project_env(root, base / "prefect-home"), base / "logs")
    project.run("git", "init", "-q")  # a clone: DVC stages what it writes (core.autostage)
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "clone")
    return project


@pytest.fixture(scope="module")
def prefect_api(project: Project) -> Iterator[str]:
    port = free_port()
    log = project.logs / "prefect-server.log"
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   project.env, log, project.root)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, log)
        project.env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        yield project.env["PREFECT_API_URL"]
    finally:
        project.env.pop("PREFECT_API_URL", None)
        stop(server)


@pytest.fixture(scope="module")
def deployment_run(project: Project, prefect_api: str) -> Iterator[dict[str, Any]]:
    """Pool, deploy from prefect.yaml, worker, one run of pipeline/demo-cpu to a terminal state."""
    project.run(str(BIN / "prefect"), "work-pool", "create", "cpu", "--type", "process")
    project.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "demo-cpu")
    worker_log = project.logs / "worker.log"
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                   project.env, worker_log, project.root)
    try:
        deployment = _api(f"{prefect_api}/deployments/name/pipeline/demo-cpu")
        started = time.monotonic()
        created = _api(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run",
                       {"parameters": {"config_path": "configs/demo.yaml", "overrides": TINY}})
        run = created
        while run["state"]["type"] not in TERMINAL and time.monotonic() - started < 420:
            time.sleep(2)
            run = _api(f"{prefect_api}/flow_runs/{created['id']}")
        run["wall_seconds"] = time.monotonic() - started
        run["worker_log"] = worker_log.read_text(errors="replace")[-6000:]
        yield run
    finally:
        stop(worker, sigterm_ignored_once=True)


def _mlflow_client(project: Project) -> Any:
    uri = f"sqlite:///{project.root / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pipeline_deployment_completes_with_run_and_version(
    project: Project, deployment_run: dict[str, Any], prefect_api: str
) -> None:
    assert deployment_run["state"]["type"] == "COMPLETED", deployment_run["worker_log"]
    assert deployment_run["parameters"]["config_path"] == "configs/demo.yaml"
    tags = set(_api(f"{prefect_api}/flow_runs/{deployment_run['id']}")["tags"])
    data_tag = next(tag for tag in tags if tag.startswith("data:"))
    assert {"demo", "cpu", "config:demo.yaml"} <= tags
    summary = json.loads((project.root / "artifacts" / "pipeline" / "last-run.json").read_text())
    assert data_tag == f"data:{summary['data_hash']}"

    client = _mlflow_client(project)
    run = client.get_run(summary["train"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.steps"] == "4"
    versions = client.search_model_versions("name='llama-adapter-v2-demo'")
    assert [str(v.version) for v in versions] == [summary["version"]["version"]]
    version = versions[0]
    assert version.run_id == run.info.run_id
    assert version.tags["data_hash"] == summary["data_hash"]
    assert float(version.tags["metric.caption_cider"]) == pytest.approx(summary["metrics"]["caption_cider"])
    champion = client.get_model_version_by_alias("llama-adapter-v2-demo", "champion")
    assert champion.version == version.version  # the first evaluated version becomes champion
    evaluation = client.get_run(version.tags["evaluation_run_id"])  # the scores live in a child run
    assert evaluation.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert evaluation.data.metrics["eval/caption_cider"] == pytest.approx(summary["metrics"]["caption_cider"])

    artifacts = _api(f"{prefect_api}/artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [deployment_run["id"]]}}})
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    assert {"pipeline-summary", "mlflow-training-run", "mlflow-model-version", "data-docs"} <= by_key.keys()
    report = by_key["pipeline-summary"]["data"]
    assert f"llama-adapter-v2-demo version {version.version}: promoted" in report
    assert "| caption_cider |" in report and "zero-init baseline" in report
    validation = json.loads((project.root / "artifacts/data/validation-metrics.json").read_text())
    row = [validation[f"caption_{key}"] for key in ("input", "clean", "quarantined", "duplicates")]
    assert "| caption | " + " | ".join(str(n) for n in row) + " |" in report
    # Prefect keeps a link artifact as its markdown, [text](link)
    assert f"/runs/{run.info.run_id})" in by_key["mlflow-training-run"]["data"]
    version_page = f"/models/llama-adapter-v2-demo/versions/{version.version})"
    assert version_page in by_key["mlflow-model-version"]["data"]
    # the validation's Data Docs: linked from the flow run and kept with the training run
    docs = project.root / "artifacts" / "data" / "reports" / "data_docs"
    assert f"({(docs / 'index.html').as_uri()})" in by_key["data-docs"]["data"]
    assert (docs / "index.html").as_uri() in report
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "data_docs")}
    assert {"data_docs/index.html", "data_docs/validations", "data_docs/expectations"} <= logged


def _as_it_was(run: Any) -> tuple[Any, ...]:
    return (run.data.metrics, run.data.params, run.info.status, run.info.start_time, run.info.end_time)


def test_a_second_pipeline_run_changes_no_run_no_version_and_no_decision(
    project: Project, deployment_run: dict[str, Any]
) -> None:
    assert deployment_run["state"]["type"] == "COMPLETED", deployment_run["worker_log"]
    client = _mlflow_client(project)
    summary = json.loads((project.root / "artifacts" / "pipeline" / "last-run.json").read_text())
    training = client.get_run(summary["train"]["run_id"])
    version = client.get_model_version("llama-adapter-v2-demo", summary["version"]["version"])
    logged = client.search_logged_models([training.info.experiment_id])

    sets = [arg for item in TINY for arg in ("--set", item)]
    output = project.run(str(BIN / "lav2"), "pipeline", "configs/demo.yaml", *sets, timeout=400).stdout
    assert f"version {version.version}" in output
    assert "stages run        none" in output  # DVC: every stage matched dvc.lock
    status = json.loads(project.run(str(BIN / "dvc"), "status", "--json").stdout)
    assert set(status) <= {"data.dvc"}, status  # the tiny demo data is not the data data.dvc records

    assert _as_it_was(client.get_run(training.info.run_id)) == _as_it_was(training)
    again = client.get_model_version("llama-adapter-v2-demo", version.version)
    assert again.tags == version.tags  # its promotion decision was not rewritten
    assert len(client.search_model_versions("name='llama-adapter-v2-demo'")) == 1
    assert len(client.search_logged_models([training.info.experiment_id])) == len(logged)


def _png_base64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(url: str, rows: list[list[str]]) -> tuple[int, dict[str, Any]]:
    payload = {"dataframe_split": {"columns": ["image", "instruction"], "data": rows}}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served_champion(project: Project, deployment_run: dict[str, Any]) -> Iterator[str]:
    assert deployment_run["state"]["type"] == "COMPLETED", deployment_run["worker_log"]
    port = free_port()
    log = project.logs / "serve.log"
    env = {**project.env, "MLFLOW_TRACKING_URI": f"sqlite:///{project.root / 'mlruns' / 'mlflow.db'}"}
    server = start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/llama-adapter-v2-demo@champion",
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, log, project.root)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/ping", server, log, timeout_s=180)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(server)


def test_served_champion_answers_and_rejects_bad_requests(served_champion: str, project: Project) -> None:
    image_path = next((project.root / "data" / "demo" / "coco" / "images").glob("*.png"))
    good = [[_png_base64(32, 32), "What is in the image?"], [str(image_path), "Describe the image."]]
    status, body = _post(served_champion, good)
    assert status == 200
    answers = [row["answer"] for row in body["predictions"]]
    assert len(answers) == 2 and all(isinstance(text, str) for text in answers)

    bad = {
        "malformed base64": ([["not*base64!", "What is it?"]], "image: neither an existing file path"),
        "oversized image": ([[_png_base64(9000, 8), "What is it?"]], "exceeds the limits"),
        "empty instruction": ([[_png_base64(32, 32), "   "]], "instruction: must be a non-empty string"),
    }
    for what, (rows, message) in bad.items():
        status, body = _post(served_champion, rows)
        assert status == 400, what
        assert message in body["message"], (what, body)

    status, body = _post(served_champion, good[:1])  # still serving after the bad requests
    assert status == 200
    assert body["predictions"][0]["answer"] == answers[0]  # greedy decoding: same image, same answer
