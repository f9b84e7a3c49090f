"""The pipeline's stages as ``dvc.yaml`` declares them, and the cache key each gets in the Prefect flow.

``dvc.yaml`` is the one list: for every stage its config parameters (``params``), and through
its ``deps`` and ``outs`` the stages it reads from. The Prefect flow keys a stage's cached
result on the values of those parameters, the keys of the stages upstream of it and, for a
stage that reads ``data``, the data version (the md5 ``data.dvc`` records; with a demo config
also the ``data.demo`` section, since the flow regenerates absent demo data from it). So a
parameter added to a stage in ``dvc.yaml`` reaches the flow's cache with no second edit.
Training's cached result names a run of one MLflow store (its run id), so the store is in the
train key and, through it, in the key of every stage downstream; the data stages' results do
not depend on the store, and another store reuses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.environment import project_root
from llama_adapter_v2.store import UNTRACKED, tracking_uri

DVC_FILE = "dvc.yaml"
DATA_DEP = "data"  # the folder data.dvc versions
# Not a dvc.yaml stage: DVC versions the demo data in data.dvc; the flow generates it when absent.
DEMO_DATA = "demo-data"
# The stages whose results name a run in the MLflow store.
MAKES_RUNS = frozenset({"train"})


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    upstream: tuple[str, ...]
    reads_data: bool


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml lists a path as a string or as a one-key mapping of the path to its options."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def _params(entries: list[Any]) -> tuple[str, ...]:
    """Parameter names, whatever params file each is listed under."""
    names: list[str] = []
    for entry in entries:
        names += [entry] if isinstance(entry, str) else [key for keys in entry.values() for key in keys]
    return tuple(names)


def _within(path: str, folder: str) -> bool:
    inner, outer = PurePosixPath(path), PurePosixPath(folder)
    return inner == outer or outer in inner.parents


def read_stages(dvc_file: Path) -> dict[str, Stage]:
    """Every stage of ``dvc_file``, in file order, with the stages whose outputs it depends on."""
    raw: dict[str, dict[str, Any]] = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    outputs = {name: _paths(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))
               for name, spec in raw.items()}
    stages = {}
    for name, spec in raw.items():
        deps = _paths(spec.get("deps", []))
        upstream = tuple(other for other, outs in outputs.items() if other != name
                         and any(_within(dep, out) or _within(out, dep) for dep in deps for out in outs))
        stages[name] = Stage(name, _params(spec.get("params", [])), upstream, DATA_DEP in deps)
    stages[DEMO_DATA] = Stage(DEMO_DATA, ("data.demo",), (), reads_data=False)
    return stages


@cache
def project_stages() -> dict[str, Stage]:
    return read_stages(project_root() / DVC_FILE)


def section(cfg: Config, dotted: str) -> Any:
    """The value of one dotted config key, as JSON data."""
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def stage_digest(name: str, cfg: Config, data_version: str) -> str:
    """What the stage's output depends on: its parameters, its upstream stages and the data."""
    stage = project_stages()[name]
    payload: dict[str, Any] = {"params": {key: section(cfg, key) for key in stage.params}}
    payload["upstream"] = {other: stage_digest(other, cfg, data_version) for other in stage.upstream}
    if stage.reads_data:
        payload["data"] = [data_version, section(cfg, "data.demo")]
    if name in MAKES_RUNS:
        payload["store"] = tracking_uri(cfg)
    return _digest(payload)


def stage_key(name: str, cfg: Config, data_version: str) -> str | None:
    """The flow's cache key of a stage; None (no caching) for untracked data."""
    if data_version == UNTRACKED:
        return None
    return f"lav2-{name}-{data_version}-{stage_digest(name, cfg, data_version)}"


def training_identity(cfg: Config, data_version: str) -> str:
    """What a checkpoint must have been trained on to be resumed: the train stage's inputs, and the
    store that holds the run its checkpoints name."""
    return stage_digest("train", cfg, data_version)
