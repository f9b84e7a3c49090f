"""Each task's training batches, endless, with the data position that a checkpoint resumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.shards import make_loader
from llama_adapter_v2.train.distributed import DistContext
from llama_adapter_v2.train.schedule import Task


@dataclass
class TaskStream:
    """Endless batches of one task, with the (epoch, batches consumed) position that resumes it."""

    task: Task
    folder: Path
    loader_args: dict[str, Any]
    epoch: int = 0
    consumed: int = 0
    _batches: Iterator[dict[str, Any]] | None = field(default=None, repr=False)

    def _open(self) -> Iterator[dict[str, Any]]:
        loader = make_loader(self.folder, epoch=self.epoch, skip_batches=self.consumed, **self.loader_args)
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._open()
        for _ in range(2):
            try:
                batch = next(self._batches)
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                self._batches = self._open()
                continue
            self.consumed += 1
            return batch
        raise RuntimeError(f"{self.folder}: an epoch of {self.task} data yields no batch")

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.consumed}


def training_stream(cfg: Config, task: Task, tokenizer: Any, image_transform: Any, ctx: DistContext
                    ) -> TaskStream:
    """This rank's stream of ``task``'s train split (without image samples for instructions when
    ``training.multimodal_instructions`` is off; the held-out loss always reads every sample)."""
    loader_args = {
        "tokenizer": tokenizer, "batch_size": cfg.training.batch_size,
        "max_tokens": cfg.training.max_tokens(task), "image_transform": image_transform,
        "seed": cfg.training.seed, "rank": ctx.rank, "world_size": ctx.world_size,
        "num_workers": cfg.data.shards.loader_workers,
        "text_only": task == "instruction" and not cfg.training.multimodal_instructions,
    }
    return TaskStream(task, DataPaths(cfg.data.work_dir).split(task, "train"), loader_args)
