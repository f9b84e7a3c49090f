"""README's runnable command blocks, executed as written, so a command that fails as written fails the build.

A ```` ```bash ```` block is runnable when the line before its fence is ``<!-- runnable -->`` (an
HTML comment: GitHub does not show it): it runs on CPU in seconds, without GPU or network. The
blocks run in README order in one fresh copy of the project (the working tree as a clone holds it,
committed to a new git repository, since DVC needs one), each under ``bash -euo pipefail``.
``make demo`` and ``make test`` are never marked: one is minutes of training, the other would run
this test again.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from live_servers import project_copy, project_env

MARKER = "<!-- runnable -->"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "readme", "GIT_AUTHOR_EMAIL": "readme@127.0.0.1",
                "GIT_COMMITTER_NAME": "readme", "GIT_COMMITTER_EMAIL": "readme@127.0.0.1"}
BLOCK_SECONDS = 150  # each block; they take seconds on 2 cores


def runnable_blocks(readme: str) -> list[tuple[int, str]]:
    """(line of the fence, the block's text) of every block the marker precedes."""
    lines = readme.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = number + 1
        assert lines[fence].strip() == "```bash", f"README.md:{fence + 1}: {MARKER} must precede ```bash"
        end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
        blocks.append((fence + 1, "\n".join(lines[fence + 1:end]) + "\n"))
    return blocks


README = Path(__file__).resolve().parents[1] / "README.md"
README_BLOCKS = runnable_blocks(README.read_text(encoding="utf-8"))


def test_the_marker_finds_the_cheap_blocks_and_never_make() -> None:
    commands = [block for _, block in README_BLOCKS]
    assert len(commands) >= 3
    assert any("lav2 config check" in block for block in commands)
    assert any("dvc repro shard" in block for block in commands)
    assert not any(line.lstrip().startswith("make ") for block in commands for line in block.splitlines())


def test_a_failing_command_fails_its_block(tmp_path: Path) -> None:
    """The runner is not lenient: a failing command in the middle of a block fails it."""
    readme = f"text\n\n{MARKER}\n```bash\ntrue\nfalse   # fails\ntrue\n```\n\n```bash\nfalse\n```\n"
    [(line, block)] = runnable_blocks(readme)
    assert line == 4
    assert run_block(block, tmp_path, {"PATH": "/usr/bin:/bin"}).returncode != 0


def run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=BLOCK_SECONDS, check=False)


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("readme")
    root = project_copy(base / "project")
    env = {**project_env(root, base / "prefect-home"), **GIT_IDENTITY}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "fresh copy"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, timeout=60)
    return root, env


@pytest.mark.slow
@pytest.mark.parametrize(("line", "block"), README_BLOCKS, ids=[f"README.md:{n}" for n, _ in README_BLOCKS])
def test_readme_block_runs_as_written(line: int, block: str,
                                      fresh_project: tuple[Path, dict[str, str]]) -> None:
    root, env = fresh_project
    started = time.monotonic()
    done = run_block(block, root, env)
    assert done.returncode == 0, (f"README.md:{line} failed as written (exit {done.returncode}, "
                                  f"{time.monotonic() - started:.0f} s):\n{block}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
