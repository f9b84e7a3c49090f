"""Where each data stage writes, under ``data.work_dir``: the one map of the data folders.

Light on purpose (no GX, no torch): training, evaluation and the held-out loss find the shards
through it without importing the stages that write them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from llama_adapter_v2.data.records import Kind

Split = Literal["train", "holdout"]
SPLITS: tuple[Split, ...] = get_args(Split)


class DataPaths:
    """Where each stage writes, under ``data.work_dir``."""

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.prepared = self.work_dir / "prepared"
        self.images_without_captions = self.prepared / "images-without-captions.json"
        self.validated = self.work_dir / "validated"
        self.quarantine = self.work_dir / "quarantine"
        self.reports = self.work_dir / "reports"
        self.data_docs = self.reports / "data_docs"  # great-expectations' Data Docs site
        self.validation_metrics = self.work_dir / "validation-metrics.json"
        self.shards = self.work_dir / "shards"
        self.shard_metrics = self.work_dir / "shard-metrics.json"

    def jsonl(self, folder: Path, kind: Kind) -> Path:
        return folder / f"{kind}s.jsonl"

    def split(self, kind: Kind, split: Split) -> Path:
        """One split's shard folder, as ``shard`` writes it (``write_shards`` into ``shards/<kind>``)."""
        return self.shards / kind / split
