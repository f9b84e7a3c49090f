"""MLflow tracking that is cheap per step and loses nothing when the server goes away.

Per-step values are buffered in memory and handed, every ``log_every_steps``, to one
background thread that sends them with ``log_batch``; the training thread never waits on
the network. A delivery that fails is appended to a local JSONL spill file; every later
delivery first replays the spill (the retry), and ``lav2 sync-metrics`` replays whatever is
left after the run. A server that is unreachable when the run starts fails the run at once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.store import check_reachable, ensure_experiment, tracking_uri, use_tracking

LOG = logging.getLogger(__name__)
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100
MAX_PARAM_CHARS = 6000
Record = dict[str, Any]


def _quiet_http_client() -> None:
    """One quick attempt per request: retrying is the spill file's job, not a blocking backoff."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"training.visual.base_lr": "0.003", ...}`` (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


# --------------------------------------------------------------------------- delivery


def _metrics_of(record: Record) -> list[Any]:
    return [Metric(key=k, value=float(v), timestamp=int(t), step=int(s)) for k, v, t, s in record["metrics"]]


def deliver(client: Any, record: Record) -> None:
    """Send one record to MLflow; raises on any failure so the caller can spill it."""
    run_id = record["run_id"]
    kind = record["kind"]
    if kind == "metrics":
        metrics = _metrics_of(record)
        for start in range(0, len(metrics), MAX_METRICS_PER_REQUEST):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_REQUEST], synchronous=True)
    elif kind == "params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for start in range(0, len(params), MAX_PARAMS_PER_REQUEST):
            client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_REQUEST], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()], synchronous=True)
    elif kind == "datasets":
        client.log_inputs(run_id, datasets=[_dataset_input(entry) for entry in record["datasets"]])
    elif kind == "artifact":
        path = Path(record["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif kind == "terminate":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def _dataset_input(entry: Mapping[str, Any]) -> DatasetInput:
    """One shard split as MLflow's dataset input: name, DVC hash as digest, folder, size as profile."""
    dataset = Dataset(name=entry["name"], digest=entry["digest"], source_type="local",
                      source=json.dumps({"uri": entry["source"]}),
                      profile=json.dumps({"num_rows": entry["samples"]}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", entry["context"])])


def replay_spill(client: Any, spill: Path) -> tuple[int, int]:
    """Deliver every record of a spill file in order; keep only those that still fail.

    Returns (delivered, remaining). Stops at the first failure so order is preserved.
    """
    if not spill.is_file():
        return 0, 0
    lines = [line for line in spill.read_text(encoding="utf-8").splitlines() if line.strip()]
    delivered = 0
    for line in lines:
        try:
            deliver(client, json.loads(line))
        except Exception:
            break
        delivered += 1
    remaining = lines[delivered:]
    if remaining:
        tmp = spill.with_suffix(".tmp")
        tmp.write_text("\n".join(remaining) + "\n", encoding="utf-8")
        tmp.replace(spill)
    else:
        spill.unlink()
    return delivered, len(remaining)


class _Courier(threading.Thread):
    """Background sender: keeps order, spills on failure, retries the spill before new records."""

    def __init__(self, client: Any, spill: Path):
        super().__init__(name="mlflow-courier", daemon=True)
        self.client = client
        self.spill = spill
        self.inbox: queue.Queue[Record | None] = queue.Queue()
        self.failures = 0

    def run(self) -> None:
        while (record := self.inbox.get()) is not None:
            self._send(record)

    def _send(self, record: Record) -> None:
        try:
            _, remaining = replay_spill(self.client, self.spill)
            if remaining:
                raise ConnectionError("spill not yet delivered")
            deliver(self.client, record)
        except Exception as err:
            self.failures += 1
            if self.failures == 1:
                LOG.warning("tracking server unavailable (%s); spilling to %s and retrying", err, self.spill)
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            with self.spill.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- trackers


class Tracker:
    """No-op tracker: tracking disabled, or a rank other than 0."""

    run_id: str | None = None
    seconds_spent: float = 0.0

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Buffer one step's values."""

    def flush(self) -> None:
        """Hand buffered values to the sender."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder."""

    def close(self, status: str = "FINISHED") -> int:
        """Deliver everything left; return how many records remain in the spill file."""
        return 0


class MlflowTracker(Tracker):
    """Buffered MLflow logging for one run (see the module docstring)."""

    def __init__(self, client: Any, run_id: str, spill: Path):
        self.client = client
        self.run_id = run_id
        self.spill = spill
        self._buffer: list[list[float]] = []
        self._keys: list[str] = []
        self._courier = _Courier(client, spill)
        self._courier.start()
        self._system_monitor: Any = None

    def submit(self, record: Record) -> None:
        self._courier.inbox.put({"run_id": self.run_id, **record})

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        started = time.perf_counter()
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._keys.append(key)
            self._buffer.append([float(value), now, step])
        self.seconds_spent += time.perf_counter() - started

    def flush(self) -> None:
        started = time.perf_counter()
        if self._buffer:
            rows = [[k, *row] for k, row in zip(self._keys, self._buffer, strict=True)]
            self.submit({"kind": "metrics", "metrics": rows})
            self._buffer, self._keys = [], []
        self.seconds_spent += time.perf_counter() - started

    def log_params(self, params: Mapping[str, str]) -> None:
        self.submit({"kind": "params", "params": dict(params)})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.submit({"kind": "tags", "tags": dict(tags)})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.submit({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Run inputs: ``{"name", "digest", "source", "samples", "context"}`` each."""
        self.submit({"kind": "datasets", "datasets": datasets})

    def start_system_metrics(self, uri: str, interval_s: float = 10.0) -> None:
        self._system_monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, tracking_uri=uri
        )
        self._system_monitor.start()

    def close(self, status: str = "FINISHED") -> int:
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self.flush()
        self.submit({"kind": "terminate", "status": status})
        self._courier.inbox.put(None)
        self._courier.join()
        for _ in range(3):  # the server may just be restarting: a few last tries
            _, remaining = replay_spill(self.client, self.spill)
            if not remaining:
                return 0
            time.sleep(1.0)
        LOG.warning(
            "%d tracking records of run %s are not delivered yet; they are in %s. "
            "Run `lav2 sync-metrics CONFIG` when the server is back.", remaining, self.run_id, self.spill,
        )
        return remaining


def spill_path(cfg: Config, run_id: str) -> Path:
    return cfg.training.output_dir / "tracking" / f"spill-{run_id}.jsonl"


def open_tracker(cfg: Config, *, resume_run_id: str | None, run_name: str | None = None) -> MlflowTracker:
    """Connect (failing fast if unreachable), create or reopen the run, log params and tags."""
    _quiet_http_client()
    check_reachable(tracking_uri(cfg))
    client = use_tracking(cfg)
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        return MlflowTracker(client, resume_run_id, spill_path(cfg, resume_run_id))
    started = time.strftime("%Y%m%d-%H%M%S")  # runs of one config must be told apart in the run list
    run = client.create_run(ensure_experiment(cfg), run_name=run_name or f"train-{cfg.name}-{started}")
    tracker = MlflowTracker(client, run.info.run_id, spill_path(cfg, run.info.run_id))
    tracker.log_params(flatten(cfg.model_dump(mode="json")))
    return tracker


def sync_spills(cfg: Config, spills: Iterable[Path] | None = None) -> dict[str, tuple[int, int]]:
    """Replay every spill file of the run folder; returns {file: (delivered, remaining)}."""
    _quiet_http_client()
    check_reachable(tracking_uri(cfg))
    client = use_tracking(cfg)
    if spills is None:
        spills = (cfg.training.output_dir / "tracking").glob("spill-*.jsonl")
    files = sorted(spills)
    return {str(path): replay_spill(client, path) for path in files}
