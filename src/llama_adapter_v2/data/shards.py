"""webdataset tar shards and a loader that is exact under resumption and across DDP ranks.

Writing: each sample is ``<key>.json`` (the record) plus ``<key>.<ext>`` (the original image
bytes) when it has an image, in standard webdataset tars (any webdataset reader can stream
them). Tar members carry mtime 0 and a fixed owner, so the same records give the same bytes.

Reading: the index lists every sample with its shard and byte offsets. An epoch is one seeded
permutation of all samples (seed, epoch); rank r of W takes the r-th of W equal contiguous
slices, so every rank gets the same number of samples and batches and no sample is read twice
in an epoch. The at most W-1 samples left over are skipped in that epoch only (the permutation
changes every epoch). This avoids the unequal per-rank counts of shard-level splitting
(STACK.md) without sampling with replacement. Because the batches are fixed before any worker
starts, the output does not depend on ``num_workers``, and ``skip_batches=k`` starts at batch k.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from llama_adapter_v2.data.formatting import IGNORE_INDEX, Tokenizer, encode_full, truncate
from llama_adapter_v2.data.paths import SPLITS, Split
from llama_adapter_v2.data.records import Kind, Record

INDEX_FILE = "index.json"


def split_of(key: str, holdout_fraction: float) -> Split:
    """Deterministic split by a hash of the key: stable across runs, machines and orderings."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "holdout" if digest / 2**64 < holdout_fraction else "train"


@dataclass(frozen=True)
class SampleEntry:
    """Where one sample lives: its shard and the byte ranges of its members."""

    id: str
    shard: int
    json: tuple[int, int]
    image: tuple[int, int] | None = None


@dataclass
class ShardIndex:
    """``index.json`` of one shard folder: counts, shard files, and every sample's location."""

    kind: Kind
    split: Split
    shards: list[dict[str, Any]]
    samples: list[SampleEntry] = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def with_images(self) -> int:
        return sum(entry.image is not None for entry in self.samples)

    def save(self, folder: Path) -> None:
        data = {"kind": self.kind, "split": self.split, "count": self.count, "with_images": self.with_images,
                "shards": self.shards, "samples": [asdict(entry) for entry in self.samples]}
        (folder / INDEX_FILE).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path | str) -> ShardIndex:
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard index (run `lav2 data shard CONFIG` first)")
        data = json.loads(path.read_text(encoding="utf-8"))
        samples = [
            SampleEntry(s["id"], s["shard"], tuple(s["json"]), tuple(s["image"]) if s["image"] else None)
            for s in data["samples"]
        ]
        return cls(kind=data["kind"], split=data["split"], shards=data["shards"], samples=samples)


# --------------------------------------------------------------------------- writing


def _image_member(record: Record) -> tuple[str, bytes] | None:
    if record.image is None:
        return None
    path = Path(record.image)
    return path.suffix.lstrip(".").lower() or "img", path.read_bytes()


def _write_shard(path: Path, records: Sequence[Record], first_key: int) -> None:
    with wds.TarWriter(str(path), mtime=0, user="lav2", group="lav2", encoder=False) as sink:
        for offset, record in enumerate(records):
            payload = record.to_dict()
            payload["image"] = Path(record.image).name if record.image else None
            sample: dict[str, Any] = {
                "__key__": f"{first_key + offset:09d}",
                "json": json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8"),
            }
            image = _image_member(record)
            if image is not None:
                sample[image[0]] = image[1]
            sink.write(sample)


def _locate_members(path: Path, shard_number: int, ids: Sequence[str]) -> list[SampleEntry]:
    """Byte ranges of each sample's members, read back from the tar headers."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = (info.offset_data, info.size)
    entries = []
    for key, record_id in zip(sorted(members), ids, strict=True):
        image = [span for ext, span in members[key].items() if ext != "json"]
        image_span = image[0] if image else None
        entries.append(SampleEntry(record_id, shard_number, members[key]["json"], image_span))
    return entries


def write_split(records: Sequence[Record], folder: Path, kind: Kind, split: Split,
                samples_per_shard: int) -> ShardIndex:
    """Write ``records`` (in order) as tar shards of ``samples_per_shard`` plus ``index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.tar"):
        stale.unlink()
    shards: list[dict[str, Any]] = []
    samples: list[SampleEntry] = []
    for number, start in enumerate(range(0, len(records), samples_per_shard)):
        chunk = records[start : start + samples_per_shard]
        path = folder / f"shard-{number:06d}.tar"
        _write_shard(path, chunk, start)
        samples.extend(_locate_members(path, number, [r.id for r in chunk]))
        shards.append({"file": path.name, "count": len(chunk)})
    index = ShardIndex(kind=kind, split=split, shards=shards, samples=samples)
    index.save(folder)
    return index


def write_shards(records: Sequence[Record], kind_dir: Path, *, kind: Kind, samples_per_shard: int,
                 holdout_fraction: float) -> dict[Split, ShardIndex]:
    """Split ``records`` by hash and write ``kind_dir/{train,holdout}``; returns both indexes."""
    chosen = [r for r in records if r.kind == kind]
    by_split: dict[Split, list[Record]] = {split: [] for split in SPLITS}
    for record in chosen:
        by_split[split_of(record.split_key, holdout_fraction)].append(record)
    return {
        split: write_split(by_split[split], kind_dir / split, kind, split, samples_per_shard)
        for split in SPLITS
    }


# --------------------------------------------------------------------------- reading


def epoch_order(count: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's sample positions for this epoch: an equal, disjoint slice of one permutation."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    per_rank = count // world_size
    if per_rank == 0:
        raise ValueError(f"{count} samples cannot give each of {world_size} ranks at least one")
    permutation = np.random.default_rng([seed, epoch]).permutation(count)
    return [int(i) for i in permutation[rank * per_rank : (rank + 1) * per_rank]]


class RememberingTokenizer:
    """The caller's tokenizer, remembering encodings: the prompt template recurs in every sample.

    The memory is bounded (first ``size`` distinct texts), so long epochs of unique responses do
    not grow it; results are identical to the wrapped tokenizer's.
    """

    def __init__(self, tokenizer: Any, size: int = 4096):
        self.tokenizer, self.size = tokenizer, size
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self._known: dict[tuple[str, bool], list[int]] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        ids = self._known.get(key)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            if len(self._known) < self.size:
                self._known[key] = ids
        return list(ids)


class ShardReader:
    """The one reader of a shard folder: a sample's record and original image bytes by byte range."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.index = ShardIndex.load(self.folder)

    def __len__(self) -> int:
        return self.index.count

    def _bytes(self, shard: int, span: tuple[int, int]) -> bytes:
        with (self.folder / self.index.shards[shard]["file"]).open("rb") as handle:
            handle.seek(span[0])
            return handle.read(span[1])

    def record(self, position: int) -> Record:
        entry = self.index.samples[position]
        return Record.from_dict(json.loads(self._bytes(entry.shard, entry.json)))

    def image_bytes(self, position: int) -> bytes | None:
        entry = self.index.samples[position]
        return None if entry.image is None else self._bytes(entry.shard, entry.image)

    def __iter__(self) -> Iterator[tuple[Record, bytes | None]]:
        """Every sample in index order."""
        for position in range(len(self)):
            yield self.record(position), self.image_bytes(position)


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as raw:
        return raw.convert("RGB")


class ShardSamples:
    """Map-style dataset over one shard folder: reads a sample and encodes it for training."""

    def __init__(self, reader: ShardReader, tokenizer: Tokenizer, max_tokens: int,
                 image_transform: Callable[[Any], Any] | None):
        self.reader = reader
        self.tokenizer = RememberingTokenizer(tokenizer)
        self.max_tokens, self.image_transform = max_tokens, image_transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, position: int) -> dict[str, Any]:
        record = self.reader.record(position)
        full_ids, full_labels = encode_full(record, self.tokenizer)
        input_ids, labels = truncate(full_ids, full_labels, self.max_tokens)
        image = None
        if self.image_transform is not None and (data := self.reader.image_bytes(position)) is not None:
            image = self.image_transform(decode_rgb(data))
        return {"id": record.id, "input_ids": input_ids, "labels": labels, "image": image,
                "truncated": len(full_ids) > len(input_ids)}


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample; padding gets attention 0 and label -100.

    ``images`` is None when no sample in the batch has one; otherwise samples without an image
    get a zero image and ``has_image`` says which are real.
    """
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.tensor(sample["input_ids"])
        labels[row, :length] = torch.tensor(sample["labels"])
        attention[row, :length] = 1
    present = [s["image"] for s in samples if s["image"] is not None]
    images = has_image = None
    if present:
        blank = torch.zeros_like(present[0])
        images = torch.stack([s["image"] if s["image"] is not None else blank for s in samples])
        has_image = torch.tensor([s["image"] is not None for s in samples])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "images": images,
            "has_image": has_image, "ids": [s["id"] for s in samples],
            "truncated": sum(bool(s.get("truncated")) for s in samples)}


class _Collator:
    """Picklable collate function (loader workers receive it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_id)


def make_loader(shard_dir: Path | str, *, tokenizer: Any, batch_size: int, max_tokens: int,
                image_transform: Callable[[Any], Any] | None, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1, skip_batches: int = 0, num_workers: int = 0,
                text_only: bool = False) -> DataLoader:
    """Batches of one shard folder for one epoch on one rank (see the module docstring).

    ``text_only`` leaves out every sample that carries an image (the paper's instruction data).
    """
    reader = ShardReader(shard_dir)
    kept = [i for i, entry in enumerate(reader.index.samples) if not text_only or entry.image is None]
    positions = epoch_order(len(kept), seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    order = [kept[i] for i in positions]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][skip_batches:]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = ShardSamples(reader, tokenizer, max_tokens, image_transform)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_Collator(pad_id))
