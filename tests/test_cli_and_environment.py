"""The installed console script, and the offline environment shared by make, bash and Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama_adapter_v2.config import load_config
from llama_adapter_v2.environment import ENV_FILE, read_env_file

REPO = Path(__file__).resolve().parents[1]
LAV2 = Path(sys.executable).with_name("lav2")


def run_lav2(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LAV2), *args], capture_output=True, text=True, env=env, check=False, cwd=REPO)


def test_console_script_is_installed() -> None:
    assert LAV2.is_file(), f"{LAV2} missing: the package is not installed with its console script"


def test_help_works_and_imports_no_torch() -> None:
    assert run_lav2("--help").returncode == 0
    code = (
        "import sys\nfrom llama_adapter_v2.cli.main import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("group", [("config",), ("config", "check"), ("config", "show")])
def test_every_command_has_help(group: tuple[str, ...]) -> None:
    result = run_lav2(*group, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_config_check_accepts_demo_and_rejects_bad_key(tmp_path: Path) -> None:
    assert run_lav2("config", "check", "configs/demo.yaml").returncode == 0
    result = run_lav2("config", "check", "configs/demo.yaml", "--set", "training.nope=1")
    assert result.returncode == 2
    assert "configs/demo.yaml: training.nope: Extra inputs are not permitted" in result.stderr


def test_config_show_writes_the_resolved_config(tmp_path: Path) -> None:
    out = tmp_path / "resolved.yaml"
    assert run_lav2("config", "show", "configs/demo.yaml", "--out", str(out)).returncode == 0
    shown = yaml.safe_load(out.read_text())
    assert shown == load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    assert shown["training"]["output_dir"].startswith(str(REPO / "artifacts"))


def test_nothing_is_written_to_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in read_env_file(REPO)}
    env["HOME"] = str(home)
    assert run_lav2("config", "check", "configs/llama3-8b.yaml", env=env).returncode == 0
    assert list(home.iterdir()) == []


def test_bash_reads_the_env_file_as_python_does() -> None:
    script = f'set -a; LAV2_ROOT={REPO}; source {ENV_FILE}; env -0'
    result = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={})
    from_bash = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    for key, value in read_env_file(REPO).items():
        assert from_bash[key] == value


def test_make_exports_the_env_file() -> None:
    result = subprocess.run(
        ["make", "-s", "-f", "Makefile", "-f", "-", "print-env"],
        input="print-env:\n\t@echo $$PREFECT_HOME $$DO_NOT_TRACK\n",
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    assert result.stdout.split() == [str(REPO / ".prefect"), "true"]
