"""The tiny project the training tests share: settings, and configs loaded from its YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llama_adapter_v2.config import Config, load_config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.shards import write_shards
from llama_adapter_v2.train.demo_base import demo_records, train_demo_base

TINY_STEPS = 12
# Recorded from a real one-process run of the tiny config (12 steps, fp32, CPU; re-recorded on
# 2026-12-02 when the demo generator gained scene questions and grounded conversations): the training
# loss per step and the held-out loss per task (step 0, step 12). A change that breaks
# learning, the schedule, the data order or the loss moves them.
PINNED_LOSSES = [4.7239, 4.2909, 4.4987, 3.9905, 4.3467, 3.9866,
                 3.9842, 4.2783, 4.0363, 4.0349, 4.5210, 4.3476]
ONE_PROCESS_HOLDOUT = {"caption": (4.7239, 4.0830), "instruction": (4.4945, 4.4373)}


def tiny_settings(root: Path) -> dict[str, Any]:
    data = root / "data" / "demo"
    return {
        "name": "tiny-train",
        "model": {
            "base": {
                "path": str(root / "artifacts" / "demo-base"),
                "arch": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "max_position_embeddings": 128},
            },
            "vision": {"arch": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "projection_dim": 32}},
            "adapter": {"prompt_len": 3, "prompt_layers": 1, "visual_layers": 1,
                        "visual": {"n_query": 2, "width": 32, "n_blocks": 1, "n_heads": 4}},
        },
        "data": {
            "captions": [{"name": "demo-coco", "format": "coco",
                          "annotations": str(data / "coco" / "annotations" / "captions.json"),
                          "images": str(data / "coco" / "images")}],
            "instructions": [
                {"name": "demo-alpaca", "format": "alpaca",
                 "path": str(data / "instructions" / "alpaca.json")},
                {"name": "demo-chat", "format": "llava", "path": str(data / "instructions" / "chat.json"),
                 "image_root": str(data / "coco" / "images")},
            ],
            "holdout_fraction": 0.2,
            "work_dir": str(root / "artifacts" / "data"),
            "shards": {"samples_per_shard": 64},
            "demo": {"seed": 0, "n_images": 16, "captions_per_image": 3, "image_size": 32,
                     "n_instructions": 60, "n_conversations": 10},
        },
        "training": {
            "steps": TINY_STEPS, "batch_size": 4, "scale_lr": False, "caption_ratio": 0.5,
            "visual": {"base_lr": 1e-2, "warmup_steps": 2}, "language": {"base_lr": 1e-2, "warmup_steps": 2},
            "max_tokens_caption": 48, "max_tokens_instruction": 96, "device": "cpu", "precision": "fp32",
            "checkpoint": {"every_steps": 4, "keep_last": 2, "keep_best": True},
            "eval_every_steps": 6, "log_every_steps": 3, "output_dir": str(root / "runs" / "default"),
            "demo_base": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "max_tokens": 96},
        },
        "tracking": {"enabled": False, "uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                     "artifact_root": str(root / "mlruns" / "artifacts"), "experiment": "tiny-train",
                     "system_metrics": False},
    }


def tiny_config(config_file: Path, output_dir: Path, *overrides: str) -> Config:
    return load_config(config_file, [f"training.output_dir={output_dir}", *overrides])


def build_tiny_project(root: Path, settings: dict[str, Any]) -> Path:
    """Demo data, caption/instruction shards and a demo base under ``root``; returns the config file."""
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    cfg = Config.model_validate(settings)
    generate_demo(cfg.data)
    records = demo_records(cfg)
    for kind in ("caption", "instruction"):
        write_shards(records, cfg.data.work_dir / "shards" / kind, kind=kind,
                     samples_per_shard=cfg.data.shards.samples_per_shard,
                     holdout_fraction=cfg.data.holdout_fraction)
    result = train_demo_base(cfg)
    (root / "base_losses.json").write_text(json.dumps(result.losses))
    return config_file
