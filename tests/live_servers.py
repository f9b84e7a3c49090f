"""Start and stop real servers and workers for the orchestration tests (127.0.0.1 only).

Every process is started in its own session and stopped by its process group id, so a test
never leaves a server, worker or flow-run subprocess behind and never touches processes it
did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests (.venv/bin under make test)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: Mapping[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("ab")
    return subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen[bytes], *, sigterm_ignored_once: bool = False) -> None:
    """SIGTERM the process group (twice for a Prefect worker, which ignores the first), then SIGINT/KILL."""
    if process.poll() is not None:
        return
    group = os.getpgid(process.pid)
    signals = [signal.SIGTERM, signal.SIGTERM] if sigterm_ignored_once else [signal.SIGTERM]
    for sig in [*signals, signal.SIGINT]:
        os.killpg(group, sig)
        try:
            process.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        os.killpg(group, signal.SIGKILL)
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # children (flow-run subprocesses) left behind
        os.killpg(group, signal.SIGKILL)


def project_copy(destination: Path) -> Path:
    """The checkout as a fresh clone would hold it, with working-tree changes: tracked and
    untracked-but-not-ignored files only (no .venv, artifacts, mlruns, generated data)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (destination / "mlruns").mkdir(exist_ok=True)
    return destination


def project_env(project: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    """Environment for commands run on the copy: its own root, Prefect home and venv on PATH."""
    env = dict(os.environ)
    # mlflow.set_tracking_uri/set_registry_uri export these: an earlier in-process test's store
    # must not become the copy's registry
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    env.update({
        "LAV2_ROOT": str(project),
        "PREFECT_HOME": str(prefect_home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(project / "src"),
    })
    env.update(extra)
    return env
