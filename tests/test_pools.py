"""The pipeline on two work pools whose workers share no filesystem, one of them killed mid-run.

A Prefect server and an MLflow server (``--serve-artifacts``) on 127.0.0.1; a git repository
(``origin``) holding the project with a tiny demo config pointed at the MLflow server, its data
versioned by ``dvc add`` and pushed to a folder remote (the only place data lives outside the
workers). A ``cpu`` and a ``gpu`` process worker, each in its own ``git clone`` with its own DVC
cache, deployed from there (``prefect deploy``). ``pipeline/demo-pools`` runs dvc.yaml's cpu
stages on the cpu worker and its gpu stages on the gpu worker, which gets the shards by
``dvc pull`` and sends models to MLflow over HTTP. The gpu worker is killed (SIGKILL, with its
flow run) while it trains; the ``reschedule-lost-flow-runs`` automation (flows/lost_runs.py)
puts the run back to Scheduled when its heartbeats stop, and a new gpu worker in a new clone
finishes it. Everything started here is stopped here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from live_servers import BIN, free_port, project_copy, project_env, start, stop, wait_healthy
from mlflow import MlflowClient

from llama_adapter_v2.stages import write_overrides

pytestmark = pytest.mark.slow

# A few steps of everything, written into the config the way a user edits it (and committed).
TINY = [
    "data.demo.n_images=24", "data.demo.n_instructions=48", "data.demo.n_conversations=12",
    "data.demo.n_probe_images=4", "data.shards.samples_per_shard=32",
    "training.demo_base.steps=6", "training.demo_base.batch_size=8",
    "training.demo_clip.steps=6", "training.demo_clip.batch_size=8",
    "training.steps=4", "training.batch_size=2", "training.checkpoint.every_steps=2",
    "training.eval_every_steps=2", "training.log_every_steps=2", "tracking.system_metrics=false",
    "tracking.promotion.beat_baseline=false", "tracking.promotion.guards={}",
]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
HEARTBEAT_S = 30  # Prefect's least heartbeat period
LOST_AFTER_S = 40  # no heartbeat for this long: the run is lost
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]


@dataclass
class Site:
    """One machine's checkout and environment."""

    root: Path
    env: dict[str, str]

    def run(self, *command: str, timeout: float = 300) -> str:
        result = subprocess.run(list(command), cwd=self.root, env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout + result.stderr


def _api(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pools")


@pytest.fixture(scope="module")
def prefect_api(base: Path) -> Iterator[str]:
    port = free_port()
    env = project_env(base, base / "prefect-server-home")
    log = base / "logs" / "prefect-server.log"
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env, log, base)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)


@pytest.fixture(scope="module")
def mlflow_server(base: Path) -> Iterator[str]:
    port = free_port()
    store = base / "mlflow-server"
    log = base / "logs" / "mlflow-server.log"
    server = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--serve-artifacts",
                    "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
                   project_env(base, base / "unused"), log, base)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@pytest.fixture(scope="module")
def origin(base: Path, mlflow_server: str) -> Path:
    """The project as its git repository holds it: tiny config, data added and pushed to the remote."""
    site = Site(project_copy(base / "origin"), project_env(base / "origin", base / "prefect-origin"))
    write_overrides(site.root / "configs" / "demo.yaml", [*TINY, f"tracking.uri={mlflow_server}"])
    site.run("git", "init", "-q")
    site.run(str(BIN / "dvc"), "remote", "add", "--default", "--force", "shared", str(base / "dvc-remote"))
    site.run(str(BIN / "lav2"), "data", "demo", "configs/demo.yaml")
    site.run(str(BIN / "dvc"), "add", "data")
    site.run(str(BIN / "dvc"), "push", "data.dvc")
    site.run("git", "add", "-A")
    site.run(*GIT, "commit", "-qm", "the project, its data versioned by data.dvc")
    shutil.rmtree(site.root / "data")  # the data lives in the remote only
    shutil.rmtree(site.root / ".dvc" / "cache")
    return site.root


def _clone(base: Path, origin: Path, name: str, prefect_api: str) -> Site:
    root = base / name
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(root)], check=True, timeout=120)
    (root / "mlruns").mkdir(exist_ok=True)
    env = project_env(root, base / f"prefect-home-{name}", PREFECT_API_URL=prefect_api,
                      PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    return Site(root, env)


def _worker(site: Site, pool: str, log: Path) -> subprocess.Popen[bytes]:
    return start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                 site.env, log, site.root)


def _kill_machine(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and every process under it (its flow run, dvc, the training): a lost machine."""
    parent = psutil.Process(worker.pid)
    for process in [*parent.children(recursive=True), parent]:
        process.kill()
    worker.wait(timeout=30)


def _flow_runs(prefect_api: str, name: str) -> list[dict[str, Any]]:
    return _api(f"{prefect_api}/flow_runs/filter", {"flows": {"name": {"any_": [name]}}})


def _running_task(prefect_api: str, flow_run_id: str) -> set[str]:
    runs = _api(f"{prefect_api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    # a task run the worker has just created may not have its first state yet (state: null)
    return {run["name"] for run in runs if (run["state"] or {}).get("type") == "RUNNING"}


@dataclass
class PoolsRun:
    pipeline: dict[str, Any]
    gpu_states: list[str]
    cpu: Site
    gpu: Site
    seconds: float
    logs: Path


@pytest.fixture(scope="module")
def pools_run(base: Path, origin: Path, prefect_api: str) -> Iterator[PoolsRun]:
    logs = base / "logs"
    cpu = _clone(base, origin, "cpu-machine", prefect_api)
    gpu = _clone(base, origin, "gpu-machine", prefect_api)
    for pool in ("cpu", "gpu"):
        cpu.run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
    cpu.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "demo-pools")
    cpu.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "stages-cpu")
    gpu.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "stages-gpu")
    cpu.run(sys.executable, "flows/lost_runs.py", "--within", str(LOST_AFTER_S))
    workers = [_worker(cpu, "cpu", logs / "worker-cpu.log"), _worker(gpu, "gpu", logs / "worker-gpu.log")]
    try:
        started = time.monotonic()
        deployment = _api(f"{prefect_api}/deployments/name/pipeline/demo-pools")
        created = _api(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", {})
        killed_during = None
        while killed_during is None and time.monotonic() - started < 900:
            time.sleep(2)
            for child in _flow_runs(prefect_api, "dvc-stages"):
                if child["parameters"].get("stages", [""])[0] == "demo-base" and (
                        busy := _running_task(prefect_api, child["id"]) & {"baseline", "train"}):
                    _kill_machine(workers[1])
                    killed_during = busy
            assert _api(f"{prefect_api}/flow_runs/{created['id']}")["state"]["type"] not in TERMINAL, (
                (logs / "worker-cpu.log").read_text()[-4000:], (logs / "worker-gpu.log").read_text()[-4000:])
        assert killed_during, "the gpu stages never reached training"
        gpu = _clone(base, origin, "gpu-machine", prefect_api)  # a new machine takes the lost one's place
        workers.append(_worker(gpu, "gpu", logs / "worker-gpu-2.log"))
        run = _api(f"{prefect_api}/flow_runs/{created['id']}")
        while run["state"]["type"] not in TERMINAL and time.monotonic() - started < 1500:
            time.sleep(3)
            run = _api(f"{prefect_api}/flow_runs/{created['id']}")
        [gpu_run] = [child for child in _flow_runs(prefect_api, "dvc-stages")
                     if child["parameters"]["stages"][0] == "demo-base"]
        states = _api(f"{prefect_api}/flow_run_states/?flow_run_id={gpu_run['id']}")
        yield PoolsRun(run, [state["name"] for state in states], cpu, gpu, time.monotonic() - started, logs)
    finally:
        for worker in workers:
            stop(worker, sigterm_ignored_once=True)


def test_pipeline_goes_through_two_pools_and_survives_a_lost_worker(
    pools_run: PoolsRun, mlflow_server: str
) -> None:
    logs = "\n".join(log.read_text(errors="replace")[-3000:] for log in sorted(pools_run.logs.glob("work*")))
    assert pools_run.pipeline["state"]["type"] == "COMPLETED", logs
    # the gpu group's run was lost with its worker, rescheduled, and finished by the new worker
    assert "AwaitingRetry" in pools_run.gpu_states and pools_run.gpu_states[-1] == "Completed"
    print(f"two-pool pipeline with a lost worker: {pools_run.seconds:.0f} s")

    cpu, gpu = pools_run.cpu.root, pools_run.gpu.root
    # nothing but the DVC remote and MLflow passed between the machines
    assert (gpu / "artifacts/data/shards").is_dir() and not (gpu / "artifacts/data/prepared").exists()
    assert (gpu / "artifacts/train/demo/adapter").is_dir()
    assert not (cpu / "artifacts/demo-base").exists() and not (cpu / "artifacts/train/demo/adapter").exists()
    summary = json.loads((cpu / "artifacts/pipeline/last-run.json").read_text())
    assert summary["tracking_uri"] == mlflow_server

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(summary["train"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["training.steps"] == "4"
    version = client.get_model_version("llama-adapter-v2-demo", summary["version"]["version"])
    assert version.run_id == run.info.run_id
    downloaded = Path(client.download_artifacts(run.info.run_id, "adapter", str(cpu.parent / "download")))
    assert (downloaded / "adapter.json").is_file()  # through the server, from its artifact destination

    # the cpu machine's dvc.lock now records every stage; a fresh clone restores every output from it
    verify = _clone(cpu.parent, cpu.parent / "origin", "verify", "http://unused")
    shutil.copy(cpu / "dvc.lock", verify.root / "dvc.lock")
    verify.run(str(BIN / "dvc"), "pull")
    assert (verify.root / "artifacts/train/demo/adapter/adapter.json").is_file()
    status = json.loads(verify.run(str(BIN / "dvc"), "status", "--json", "data.dvc", "shard", "register"))
    assert status == {}, status
