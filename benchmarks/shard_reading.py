"""Shard-reading throughput: samples/s with image decode, for the data loader and plain webdataset.

Generates the demo data into a temp folder, writes caption shards, then times full passes over
the train split (``--rounds`` passes each, median reported):
- ``make_loader`` (index-addressed reads, JSON parse, tokenization, PIL decode, RGB, a 32x32
  resize-to-tensor transform, collation) with 0 and 2 loader workers;
- ``webdataset`` streaming the same tars with ``.decode("pil")`` (decode only, no tokenization).

    .venv/bin/python benchmarks/shard_reading.py [--rounds 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import llama_adapter_v2  # noqa: F401 - offline environment
from llama_adapter_v2.config import load_config
from llama_adapter_v2.data.demo import generate_demo
from llama_adapter_v2.data.formatting import segments
from llama_adapter_v2.data.readers import read_coco
from llama_adapter_v2.data.shards import ShardIndex, make_loader, write_shards
from llama_adapter_v2.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """The shape of work the model's transform does: resize, scale, CHW."""
    return torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def samples_per_second(passes: Callable[[], Iterable[Any]], count_of: Callable[[Any], int],
                       rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        start, seen = time.perf_counter(), 0
        for item in passes():
            seen += count_of(item)
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def prepare(work: Path) -> tuple[Path, Any]:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    source = cfg.data.captions[0]
    source.annotations = work / "coco" / "captions.json"
    source.images = work / "coco" / "images"
    for instruction_source in cfg.data.instructions:
        instruction_source.path = work / Path(instruction_source.path).name
    generate_demo(cfg.data)
    records = [raw.to_record() for raw in read_coco(source)]
    shards = cfg.data.shards
    write_shards(records, work / "shards", kind="caption", samples_per_shard=shards.samples_per_shard,
                 holdout_fraction=cfg.data.holdout_fraction)
    texts = ["".join(text for text, _ in segments(r)) for r in records]
    return work / "shards" / "train", train_tokenizer(texts, 512, work / "tokenizer")


def measure(rounds: int) -> dict[str, Any]:
    import webdataset as wds

    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = prepare(Path(tmp))
        count = ShardIndex.load(folder).count
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        result: dict[str, Any] = {"samples_per_pass": count, "image_size": 64, "rounds": rounds}
        for workers in (0, 2):
            def loader(workers: int = workers) -> Iterable[Any]:
                return make_loader(folder, tokenizer=tokenizer, batch_size=16, max_tokens=48,
                                   image_transform=to_tensor, seed=0, epoch=0, num_workers=workers)
            rate = samples_per_second(loader, lambda b: len(b["ids"]), rounds)
            result[f"make_loader_workers_{workers}"] = rate
        result["webdataset_decode_pil"] = samples_per_second(
            lambda: wds.WebDataset(urls, shardshuffle=False).decode("pil"), lambda _: 1, rounds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
