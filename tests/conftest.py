"""Shared test set-up: the offline environment, a guard against outside connections, and ``require``.

``require(condition, reason)`` is the one way a test says it needs something pip cannot install
(a system binary such as Tesseract, the real-data kit in ../shared): without it the test is
skipped with the reason; with ``LAV2_REQUIRE_ALL_TESTS=1`` (set by .ci/run) it fails instead, so
CI cannot go green by skipping what it was meant to run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import network_guard
import pytest
from hypothesis import settings

import llama_adapter_v2  # noqa: F401 - applies offline.env before any heavy import
from llama_adapter_v2.config import load_config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.formatting import segments
from llama_adapter_v2.data.readers import read_coco, read_instructions
from llama_adapter_v2.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
SHARED_REAL = REPO.parent / "shared" / "data" / "real"
REQUIRE_ALL_TESTS = "LAV2_REQUIRE_ALL_TESTS"


network_guard.install()

# Property-based tests: the same cases on every CI run (derandomized, no example database); locally
# random, so each run may find something new. No deadline: the machine is shared and GX is slow.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") or os.environ.get(REQUIRE_ALL_TESTS) == "1" else "dev")


def require_or_skip(condition: bool, reason: str) -> None:
    """Go on when ``condition`` holds; else skip with ``reason``, or fail under LAV2_REQUIRE_ALL_TESTS=1."""
    if condition:
        return
    if os.environ.get(REQUIRE_ALL_TESTS) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL_TESTS}=1: what this test needs must be there)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def require() -> Callable[[bool, str], None]:
    """``require(condition, reason)`` for tests and fixtures (see the module docstring)."""
    return require_or_skip


@pytest.fixture(autouse=True)
def isolated_mlflow_uris() -> Iterator[None]:
    """mlflow.set_tracking_uri/set_registry_uri export env vars; one test's store must not leak."""
    saved = {key: os.environ.get(key) for key in MLFLOW_URI_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real, or a skip that says why (CI has it; a bare clone may not)."""
    require_or_skip(SHARED_REAL.is_dir(),
                    f"real-data kit not found at {SHARED_REAL} (it lives in ../shared beside the clone)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def demo_data_config(tmp_path_factory: pytest.TempPathFactory):
    """configs/demo.yaml with the demo data generated into a temp folder (and work_dir there too)."""
    root = tmp_path_factory.mktemp("demo-data")
    cfg = load_config(REPO / "configs" / "demo.yaml")
    for source in cfg.data.captions:
        source.annotations = root / source.annotations.relative_to(REPO)
        source.images = root / source.images.relative_to(REPO)
    for source in cfg.data.instructions:
        source.path = root / source.path.relative_to(REPO)
        if source.image_root is not None:
            source.image_root = root / source.image_root.relative_to(REPO)
    if cfg.data.grounded is not None:
        cfg.data.grounded.questions = root / cfg.data.grounded.questions.relative_to(REPO)
        cfg.data.grounded.images = root / cfg.data.grounded.images.relative_to(REPO)
    cfg.data.work_dir = root / "artifacts" / "data"
    generate_demo(cfg.data)
    return cfg


@pytest.fixture(scope="session")
def demo_tokenizer(demo_data_config, tmp_path_factory: pytest.TempPathFactory):
    """A 512-token BPE trained on the demo data's rendered texts (as the demo base stage does)."""
    raw = [r for s in demo_data_config.data.captions for r in read_coco(s)]
    raw += [r for s in demo_data_config.data.instructions for r in read_instructions(s)]
    texts = ["".join(text for text, _ in segments(r.to_record())) for r in raw]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("demo-tokenizer"))
