"""A tiny project for the training tests: demo data, shards and a briefly trained base, once per session.

Everything is real (generated demo images and tasks, webdataset shards, a tokenizer and a
tiny Llama trained on the text) but small, so a training step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_project import build_tiny_project, tiny_settings


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated demo data, caption/instruction shards and a demo base; returns the config file."""
    root = tmp_path_factory.mktemp("tiny-project")
    return build_tiny_project(root, tiny_settings(root))
