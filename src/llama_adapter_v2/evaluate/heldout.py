"""The held-out samples evaluation generates for: captions grouped by image, instruction records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.records import Record
from llama_adapter_v2.data.shards import ShardReader, decode_rgb
from llama_adapter_v2.evaluate.options import EvalOptions


@dataclass
class HeldOut:
    """Held-out captions grouped by image, and held-out instruction records with their images."""

    images: dict[str, Image.Image] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    instructions: list[tuple[Record, Image.Image | None]] = field(default_factory=list)


def read_holdout_records(folder: Path) -> Iterator[tuple[Record, Image.Image | None]]:
    """Every record of a shard folder with its decoded RGB image, in index order."""
    for record, data in ShardReader(folder):
        yield record, None if data is None else decode_rgb(data)


def load_holdout(cfg: Config, options: EvalOptions) -> HeldOut:
    held = HeldOut()
    paths = DataPaths(cfg.data.work_dir)
    captions = paths.split("caption", "holdout")
    for record, image in read_holdout_records(captions):
        key = record.image or record.id
        if key not in held.images:
            if options.max_images is not None and len(held.images) >= options.max_images:
                continue
            if image is None:
                raise ValueError(f"{captions}: caption record {record.id} has no image")
            held.images[key] = image
        held.references.setdefault(key, []).append(record.response)
    for record, image in read_holdout_records(paths.split("instruction", "holdout")):
        if options.max_instructions is not None and len(held.instructions) >= options.max_instructions:
            break
        held.instructions.append((record, image))
    return held
