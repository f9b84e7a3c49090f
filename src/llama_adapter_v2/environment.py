"""The quiet/offline environment, applied before any heavy library is imported.

Telemetry, hub access and home-directory state are switched off by environment variables
that the libraries read at import time, so this must run first: the package applies it
in its ``__init__``. The variables live in ``offline.env``, shared with the Makefile and
``.ci/run`` so the three entry points cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = Path(__file__).with_name("offline.env")


def project_root() -> Path:
    """The folder that holds configs/, data/ and mlruns/.

    ``LAV2_ROOT`` wins; otherwise a source checkout (the package under ``src/``) is its own
    root; otherwise the current directory.
    """
    if root := os.environ.get("LAV2_ROOT"):
        return Path(root).resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout
    return Path.cwd().resolve()


def read_env_file(root: Path, path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE pairs of the env file, with ``${LAV2_ROOT}`` expanded."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().replace("${LAV2_ROOT}", str(root))
    return values


def apply() -> Path:
    """Set every variable of the env file that the caller has not set; return the root."""
    root = project_root()
    os.environ.setdefault("LAV2_ROOT", str(root))
    for key, value in read_env_file(root).items():
        os.environ.setdefault(key, value)
    return root
