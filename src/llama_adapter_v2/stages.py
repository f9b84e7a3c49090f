"""The pipeline's stages as ``dvc.yaml`` declares them: the one list that DVC and the Prefect flow share.

``dvc.yaml`` names, for every stage, its command, its config parameters, its dependencies and
outputs, and (in ``meta.pool``) the work pool it belongs on. The flow reads that here and runs
each stage through ``dvc repro --single-item``, so it never keeps a second list that could
drift from DVC's. What moves between workers that share no filesystem is what DVC itself
records: the ``dvc.lock`` entries of the stages one worker ran (small YAML, passed by the
orchestrator) and the outputs they name (``dvc push`` / ``dvc pull`` through the remote).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from ruamel.yaml import YAML

from llama_adapter_v2.config.loader import apply_overrides, read_yaml

DVC_FILE = "dvc.yaml"
LOCK_FILE = "dvc.lock"
DATA_DEP = "data"  # the folder data.dvc versions
DATA_FILE = "data.dvc"
DEFAULT_POOL = "cpu"


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    params_files: tuple[str, ...]
    upstream: tuple[str, ...]
    reads_data: bool
    pool: str


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml lists a path as a string or as a one-key mapping of the path to its options."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def _params(entries: list[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Parameter names, and the params files they are read from (DVC's default: params.yaml)."""
    names: list[str] = []
    files: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
            files.append("params.yaml")
            continue
        for file, keys in entry.items():
            names += keys
            files.append(file)
    return tuple(names), tuple(dict.fromkeys(files))


def _within(path: str, folder: str) -> bool:
    inner, outer = PurePosixPath(path), PurePosixPath(folder)
    return inner == outer or outer in inner.parents


def outputs(spec: dict[str, Any]) -> list[str]:
    """Every path a stage writes: outs, metrics and plots."""
    return _paths(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))


def read_stages(dvc_file: Path) -> dict[str, Stage]:
    """Every stage of ``dvc_file`` in file order, with the stages whose outputs it reads."""
    raw: dict[str, dict[str, Any]] = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    written = {name: outputs(spec) for name, spec in raw.items()}
    stages = {}
    for name, spec in raw.items():
        deps = _paths(spec.get("deps", []))
        upstream = tuple(other for other, outs in written.items() if other != name
                         and any(_within(dep, out) or _within(out, dep) for dep in deps for out in outs))
        params, files = _params(spec.get("params", []))
        pool = (spec.get("meta") or {}).get("pool", DEFAULT_POOL)
        stages[name] = Stage(name, params, files, upstream, DATA_DEP in deps, pool)
    return stages


def pipeline_config(stages: dict[str, Stage]) -> str:
    """The one config file every stage reads its parameters from (dvc.yaml's params file)."""
    files = {file for stage in stages.values() for file in stage.params_files}
    if len(files) != 1:
        raise ValueError(f"{DVC_FILE}: the stages read parameters from {sorted(files)}; the flow needs one")
    return files.pop()


def pool_groups(stages: dict[str, Stage]) -> list[tuple[str, list[str]]]:
    """Consecutive stages on one pool, in order: each group is one flow run on a worker of that pool."""
    groups: list[tuple[str, list[str]]] = []
    for stage in stages.values():
        if groups and groups[-1][0] == stage.pool:
            groups[-1][1].append(stage.name)
        else:
            groups.append((stage.pool, [stage.name]))
    return groups


def upstream_of(stages: dict[str, Stage], names: list[str]) -> list[str]:
    """The stages outside ``names`` whose outputs the stages in ``names`` read (what a worker pulls)."""
    wanted = [other for name in names for other in stages[name].upstream if other not in names]
    return list(dict.fromkeys(wanted))


def write_overrides(config_file: Path, overrides: list[str]) -> bool:
    """Write ``dotted.key=value`` overrides into the config file, comments kept, as ``dvc exp run
    --set-param`` does: DVC reads parameters from the file, so a run's dvc.lock records what it ran
    with. Returns whether the file changed."""
    if not overrides:
        return False
    read_yaml(config_file)  # the loader's checks (UTF-8, unique keys) before round-tripping
    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 4096
    editor.indent(mapping=2, sequence=4, offset=2)  # the configs' own layout
    document = editor.load(config_file.read_text(encoding="utf-8"))
    apply_overrides(document, overrides, config_file)
    before = config_file.read_text(encoding="utf-8")
    with config_file.open("w", encoding="utf-8") as handle:
        editor.dump(document, handle)
    return config_file.read_text(encoding="utf-8") != before


def lock_entries(root: Path, names: list[str]) -> dict[str, Any]:
    """The dvc.lock entries of ``names`` (the hashes of what those stages read and wrote)."""
    lock = root / LOCK_FILE
    recorded = yaml.safe_load(lock.read_text(encoding="utf-8"))["stages"] if lock.is_file() else {}
    return {name: recorded[name] for name in names if name in recorded}


def merge_lock(root: Path, entries: dict[str, Any]) -> None:
    """Record another worker's stage entries in this checkout's dvc.lock, so ``dvc pull`` fetches
    their outputs and ``dvc repro`` sees those stages as done."""
    if not entries:
        return
    lock = root / LOCK_FILE
    recorded = yaml.safe_load(lock.read_text(encoding="utf-8")) if lock.is_file() else None
    recorded = recorded or {"schema": "2.0", "stages": {}}
    recorded["stages"].update(entries)
    lock.write_text(yaml.safe_dump(recorded, sort_keys=False), encoding="utf-8")
