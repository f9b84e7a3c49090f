"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``<output_dir>/checkpoints/step-XXXXXXX/`` holding the adapter (in the
model's ``save_adapter`` format), tensors in safetensors files and everything else in JSON.
It is written into a temporary sibling folder, every file is fsynced, ``MANIFEST.json`` (the
sha256 and size of every other file) is written last, and only then is the folder renamed into
place. A folder without a manifest, or whose files do not match it, is damaged: resume skips it
with a warning that names it and falls back to the next newest. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LOG = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
STEP_PATTERN = re.compile(r"^step-(\d{7})$")
BEST = "best"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be trusted; the message names the folder and the file."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a verified checkpoint holds: its folder, tensors and JSON state."""

    folder: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.folder / ADAPTER_DIR


def step_folder_name(step: int) -> str:
    return f"step-{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: so a rename survives a crash)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(folder: Path, step: int) -> None:
    files = {
        str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in _files_under(folder)
    }
    for path in _files_under(folder):
        _fsync_path(path)
    for sub in sorted({p.parent for p in _files_under(folder)}):
        _fsync_path(sub)
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync_path(manifest)
    _fsync_path(folder)


def verify_checkpoint(folder: Path) -> int:
    """Return the step of a complete checkpoint, or raise CheckpointError saying what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write never completed)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed: dict[str, dict[str, Any]] = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest")
    return step


def write_checkpoint(
    root: Path,
    step: int,
    *,
    save_adapter: Callable[[Path], None],
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write ``root/step-XXXXXXX`` atomically and return it (an existing one is replaced)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_folder_name(step)
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_adapter(staging / ADAPTER_DIR)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / TENSORS_FILE))
    (staging / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    _write_manifest(staging, step)
    _replace_folder(staging, final)
    return final


def _replace_folder(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an old ``target`` is moved aside first, then removed."""
    retired = target.with_name(f".old-{target.name}-{os.getpid()}")
    if target.exists():
        target.rename(retired)
    source.rename(target)
    _fsync_path(target.parent)
    if retired.exists():
        shutil.rmtree(retired)


def load_checkpoint(folder: Path) -> LoadedCheckpoint:
    """Verify a checkpoint and read its tensors and state (safetensors and JSON only)."""
    step = verify_checkpoint(folder)
    tensors = load_file(str(folder / TENSORS_FILE))
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return LoadedCheckpoint(folder=folder, step=step, tensors=tensors, state=state)


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Step folders under ``root``, newest first (temporary and retired folders excluded)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted(found, reverse=True)


def latest_complete_checkpoint(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; each damaged newer one is skipped with a warning."""
    for _, folder in step_checkpoints(root):
        try:
            return load_checkpoint(folder)
        except (CheckpointError, OSError, ValueError) as err:
            LOG.warning("skipping damaged checkpoint %s: %s", folder, err)
    return None


def recorded_run_id(root: Path) -> str | None:
    """The MLflow run of the training that wrote ``root``'s checkpoints: its newest complete one says."""
    loaded = latest_complete_checkpoint(root) if root.is_dir() else None
    run_id = loaded.state.get("run_id") if loaded is not None else None
    return str(run_id) if run_id else None


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` step folders and leftover temporary folders."""
    removed = [folder for _, folder in step_checkpoints(root)[keep_last:]]
    removed += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))] if root.is_dir() else []
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def mark_best(root: Path, checkpoint: Path, metric: float) -> Path:
    """Copy a verified checkpoint to ``root/best`` atomically, recording the metric that won."""
    verify_checkpoint(checkpoint)
    staging = root / f".tmp-{BEST}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(checkpoint, staging, copy_function=_link_or_copy)
    (staging / "BEST.json").write_text(
        json.dumps({"from": checkpoint.name, "holdout_loss": metric}), encoding="utf-8"
    )
    _fsync_path(staging / "BEST.json")
    _replace_folder(staging, root / BEST)
    return root / BEST


def best_metric(root: Path) -> float | None:
    """The held-out loss of the current best checkpoint, if a valid one exists."""
    record = root / BEST / "BEST.json"
    if not record.is_file():
        return None
    try:
        verify_checkpoint(root / BEST)
    except CheckpointError as err:
        LOG.warning("ignoring damaged best checkpoint: %s", err)
        return None
    return float(json.loads(record.read_text(encoding="utf-8"))["holdout_loss"])


def _link_or_copy(src: str, dst: str) -> str:
    """Hard links cost no space; checkpoint files are never modified in place, so sharing is safe."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
