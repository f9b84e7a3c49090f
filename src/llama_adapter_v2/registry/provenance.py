"""What a registered version was made from: code commit, data hash, config digest."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from llama_adapter_v2.config import Config

UNTRACKED = "untracked"


def git_commit(root: Path) -> str:
    """HEAD of the checkout, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return UNTRACKED
    return f"{head}-dirty" if dirty else head


def data_hash(root: Path) -> str:
    """The md5 DVC recorded for the data folder in ``data.dvc`` (``untracked`` without it)."""
    dvc_file = root / "data.dvc"
    if not dvc_file.is_file():
        return UNTRACKED
    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise ValueError(f"{dvc_file}: outs[0].md5 missing; run `dvc add data` again")
    return str(outs[0]["md5"])


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_digest(cfg: Config) -> str:
    """Hash of the resolved config: equal configs give equal digests whatever their YAML layout."""
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()[:16]


def folder_identity(folder: Path) -> str:
    """sha256 over the names and bytes of the config and weight files of a model folder."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".model", ".txt"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
