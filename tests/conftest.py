"""Shared test set-up: the offline environment, and a guard against outside connections."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import network_guard
import pytest

import llama_adapter_v2  # noqa: F401 - applies offline.env before any heavy import

REPO = Path(__file__).resolve().parents[1]
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


network_guard.install()


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
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real-data kit not found at {SHARED_REAL} (it lives in ../shared beside the clone)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def demo_data_config(tmp_path_factory: pytest.TempPathFactory):
    """configs/demo.yaml with the demo data generated into a temp folder (and work_dir there too)."""
    from llama_adapter_v2.config import load_config
    from llama_adapter_v2.data.demo import generate_demo

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
    from llama_adapter_v2.data.formatting import segments
    from llama_adapter_v2.data.readers import read_coco, read_instructions
    from llama_adapter_v2.data.tokenizer import train_tokenizer

    raw = [r for s in demo_data_config.data.captions for r in read_coco(s)]
    raw += [r for s in demo_data_config.data.instructions for r in read_instructions(s)]
    texts = ["".join(text for text, _ in segments(r.to_record())) for r in raw]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("demo-tokenizer"))
