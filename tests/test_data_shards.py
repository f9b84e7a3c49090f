"""webdataset shards: counts, split, and a loader exact across ranks, epochs, workers and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from llama_adapter_v2.data.formatting import encode_record
from llama_adapter_v2.data.readers import read_coco, read_instructions
from llama_adapter_v2.data.records import Record
from llama_adapter_v2.data.shards import ShardIndex, make_loader, split_of, write_shards


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in for the model's image transform (module level: loader workers pickle it)."""
    if image.mode != "RGB":
        raise AssertionError(f"the loader must hand over RGB images, got {image.mode}")
    array = np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture(scope="module")
def shard_root(demo_data_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = demo_data_config.data
    root = tmp_path_factory.mktemp("shards")
    captions = [r.to_record() for s in data.captions for r in read_coco(s)]
    instructions = [r.to_record() for s in data.instructions for r in read_instructions(s)]
    write_shards(captions, root / "caption", kind="caption", samples_per_shard=100, holdout_fraction=0.1)
    write_shards(instructions, root / "instruction", kind="instruction", samples_per_shard=100,
                 holdout_fraction=0.1)
    return root


def test_index_counts_match_the_tars(shard_root: Path) -> None:
    train = ShardIndex.load(shard_root / "caption/train")
    holdout = ShardIndex.load(shard_root / "caption/holdout")
    assert train.count + holdout.count == 1200
    assert 0 < holdout.count < 240
    assert train.with_images == train.count
    assert sum(shard["count"] for shard in train.shards) == train.count
    assert len(train.shards) == -(-train.count // 100)
    instruction = ShardIndex.load(shard_root / "instruction/train")
    holdout_instr = ShardIndex.load(shard_root / "instruction/holdout")
    assert instruction.count + holdout_instr.count == 1680
    assert instruction.with_images + holdout_instr.with_images == 240  # even conversations carry an image


def test_captions_of_one_image_stay_in_one_split(shard_root: Path) -> None:
    splits_by_image: dict[str, set[str]] = {}
    for split in ("train", "holdout"):
        urls = sorted(str(p) for p in (shard_root / "caption" / split).glob("*.tar"))
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            record = json.loads(sample["json"])
            splits_by_image.setdefault(record["image"], set()).add(split)
    assert len(splits_by_image) == 240
    assert all(len(splits) == 1 for splits in splits_by_image.values())


def test_split_is_a_stable_hash_of_the_key() -> None:
    keys = [f"demo:{i}" for i in range(2000)]
    holdout = [k for k in keys if split_of(k, 0.1) == "holdout"]
    assert 150 < len(holdout) < 250
    assert holdout == [k for k in keys if split_of(k, 0.1) == "holdout"]
    assert {split_of(k, 0.0) for k in keys} == {"train"} and {split_of(k, 1.0) for k in keys} == {"holdout"}


def test_webdataset_streams_the_shards(shard_root: Path) -> None:
    folder = shard_root / "caption/train"
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    index = ShardIndex.load(folder)
    assert [json.loads(json.dumps(s["json"]))["id"] for s in samples] == [e.id for e in index.samples]
    assert all(s["png"].size == (64, 64) for s in samples)


def epoch_ids(folder: Path, tokenizer, **kwargs) -> list[list[str]]:
    loader = make_loader(folder, tokenizer=tokenizer, batch_size=8, max_tokens=64, image_transform=to_tensor,
                         **{"seed": 0, "epoch": 0, **kwargs})
    return [batch["ids"] for batch in loader]


def test_two_ranks_get_equal_batches_and_no_sample_twice(shard_root: Path, demo_tokenizer) -> None:
    folder = shard_root / "caption/train"
    total = ShardIndex.load(folder).count
    for epoch in (0, 1):
        ranks = [epoch_ids(folder, demo_tokenizer, epoch=epoch, rank=r, world_size=2) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == -(-(total // 2) // 8)
        seen = [i for rank in ranks for batch in rank for i in batch]
        assert len(seen) == len(set(seen)) == total - total % 2
    folder = shard_root / "instruction/holdout"
    total = ShardIndex.load(folder).count
    three = [epoch_ids(folder, demo_tokenizer, rank=r, world_size=3) for r in range(3)]
    assert len({len(rank) for rank in three}) == 1
    assert len({i for rank in three for batch in rank for i in batch}) == total - total % 3


def test_the_loader_is_deterministic_and_resumes_exactly(shard_root: Path, demo_tokenizer) -> None:
    folder = shard_root / "instruction/holdout"
    full = epoch_ids(folder, demo_tokenizer, seed=3, epoch=2)
    assert full == epoch_ids(folder, demo_tokenizer, seed=3, epoch=2)
    assert epoch_ids(folder, demo_tokenizer, seed=3, epoch=2, skip_batches=5) == full[5:]
    assert full != epoch_ids(folder, demo_tokenizer, seed=3, epoch=3)
    assert sorted(i for b in full for i in b) == sorted(e.id for e in ShardIndex.load(folder).samples)


def test_workers_do_not_change_the_batches(shard_root: Path, demo_tokenizer) -> None:
    folder = shard_root / "caption/holdout"
    kwargs = {"tokenizer": demo_tokenizer, "batch_size": 4, "max_tokens": 48, "image_transform": to_tensor,
              "seed": 1, "epoch": 0}
    single = list(make_loader(folder, **kwargs))
    parallel = list(make_loader(folder, num_workers=2, **kwargs))
    assert len(single) == len(parallel)
    for a, b in zip(single, parallel, strict=True):
        assert a["ids"] == b["ids"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])


def test_batches_pad_with_masked_labels_and_carry_images(shard_root: Path, demo_tokenizer) -> None:
    loader = make_loader(shard_root / "instruction/train", tokenizer=demo_tokenizer, batch_size=16,
                         max_tokens=128, image_transform=to_tensor, seed=0, epoch=0)
    saw_images = saw_text_only = False
    for batch in loader:
        mask = batch["attention_mask"].bool()
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == batch["labels"].shape
        assert (batch["labels"][~mask] == -100).all()
        assert (batch["input_ids"][~mask] == demo_tokenizer.pad_token_id).all()
        if batch["images"] is None:
            saw_text_only = True
            continue
        saw_images = True
        assert batch["images"].shape == (len(batch["ids"]), 3, 32, 32)
        blank = ~batch["has_image"]
        assert (batch["images"][blank] == 0).all()
    assert saw_images and saw_text_only


def test_text_only_leaves_out_exactly_the_samples_with_an_image(shard_root: Path, demo_tokenizer) -> None:
    folder = shard_root / "instruction/train"
    index = ShardIndex.load(folder)
    with_image = {entry.id for entry in index.samples if entry.image is not None}
    kwargs = {"tokenizer": demo_tokenizer, "batch_size": 16, "max_tokens": 128, "image_transform": to_tensor,
              "seed": 0, "epoch": 0}
    every = [i for batch in make_loader(folder, **kwargs) for i in batch["ids"]]
    text = [i for batch in make_loader(folder, text_only=True, **kwargs) for i in batch["ids"]]
    assert with_image and set(every) == {entry.id for entry in index.samples}
    assert set(text) == set(every) - with_image and len(text) == len(set(text))


def test_loader_tokens_are_encode_record_of_the_stored_record(shard_root: Path, demo_tokenizer) -> None:
    folder = shard_root / "instruction/holdout"
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    stored = [Record.from_dict(json.loads(s["json"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    by_id = {record.id: record for record in stored}
    rows = 0
    for batch in make_loader(folder, tokenizer=demo_tokenizer, batch_size=8, max_tokens=40,
                             image_transform=None, seed=0, epoch=0):
        assert batch["images"] is None
        for row, record_id in enumerate(batch["ids"]):
            ids, labels = encode_record(by_id[record_id], demo_tokenizer, 40)
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
            assert batch["labels"][row, : len(ids)].tolist() == labels
            rows += 1
    assert rows == len(stored)
