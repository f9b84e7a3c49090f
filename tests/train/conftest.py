"""A tiny project for the training tests: demo data, shards and a briefly trained base, once per session.

Everything is real (generated demo images and tasks, webdataset shards, a tokenizer and a
tiny Llama trained on the text) but small, so a training step takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_project import tiny_settings

from llama_adapter_v2.config import Config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.shards import write_shards
from llama_adapter_v2.train.demo_base import demo_records, train_demo_base


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated demo data, caption/instruction shards and a demo base; returns the config file."""
    root = tmp_path_factory.mktemp("tiny-project")
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_settings(root), sort_keys=False))
    cfg = Config.model_validate(tiny_settings(root))
    generate_demo(cfg.data)
    records = demo_records(cfg)
    for kind in ("caption", "instruction"):
        write_shards(records, cfg.data.work_dir / "shards" / kind, kind=kind,
                     samples_per_shard=cfg.data.shards.samples_per_shard,
                     holdout_fraction=cfg.data.holdout_fraction)
    result = train_demo_base(cfg)
    (root / "base_losses.json").write_text(json.dumps(result.losses))
    return config_file
