"""The visual path must carry information: after a few hundred caption steps, a caption's own image
must give a clearly lower loss than another sample's image.

The test builds its own project, the demo in small: a tokenizer of 512 tokens and a base that has
read its text for 300 steps, a tower trained contrastively on the training captions (the demo-clip
stage), visual prompts in every layer at 4x the LayerNorm's scale (configs/demo.yaml). Measured on
2 cores: loss 0.432 with the right image against 0.595 with a shuffled one; with a random tower
0.441 against 0.552.

It replaces a strict expected failure that measured nothing: on the shared tiny project (a
tokenizer of 320 tokens) the caption prompt alone filled ``training.max_tokens_caption=48``, so
every caption was cut to its end token and the right and the shuffled image gave the same loss
whatever the model learned. The test now refuses measured batches whose captions were cut.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from tiny_project import build_tiny_project, tiny_config, tiny_settings

from llama_adapter_v2.data.shards import make_loader
from llama_adapter_v2.train.demo_clip import train_demo_clip
from llama_adapter_v2.train.distributed import DistContext
from llama_adapter_v2.train.step import train_step
from llama_adapter_v2.train.trainer import Trainer

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STEPS = 300
MAX_CAPTION_TOKENS = 128


@pytest.fixture(scope="module")
def seeing_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with a base that can read its captions and a contrastively trained tower."""
    root = tmp_path_factory.mktemp("seeing-project")
    settings = tiny_settings(root)
    settings["model"]["base"]["arch"]["vocab_size"] = 512
    settings["training"]["demo_base"]["steps"] = 300
    settings["model"]["vision"]["path"] = str(root / "artifacts" / "demo-clip")
    config_file = build_tiny_project(root, settings)
    train_demo_clip(tiny_config(config_file, root / "clip-run", "training.demo_clip.steps=150",
                                "training.demo_clip.batch_size=16"))
    return config_file


def _caption_loss(trainer: Trainer, batches: list[dict], permute: bool) -> float:
    """Token-weighted caption loss; ``permute`` hands every caption another sample's image."""
    total, tokens = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            images = batch["images"]
            if permute:  # a derangement: no caption keeps its own image
                shift = int(torch.randint(1, len(images), (1,), generator=generator))
                images = images.roll(shift, dims=0)
            count = int((batch["labels"][:, 1:] != -100).sum())
            loss = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"], images=images).loss
            total, tokens = total + float(loss) * count, tokens + count
    return total / tokens


def test_caption_loss_with_the_right_image_is_clearly_below_a_shuffled_one(
    seeing_project: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(seeing_project, tmp_path / "run", f"training.steps={STEPS}",
                      "training.caption_ratio=1.0", "training.trainable=all", "training.visual.base_lr=1e-2",
                      "training.language.base_lr=1e-2", f"training.max_tokens_caption={MAX_CAPTION_TOKENS}",
                      "model.adapter.prompt_layers=0", "model.adapter.visual_layers=2",
                      "model.adapter.visual.output_gain=4.0", "training.checkpoint.every_steps=1000")
    trainer = Trainer(cfg, SINGLE)
    stream = trainer.streams["caption"]
    loader_args = {**stream.loader_args, "batch_size": 8}
    seen = list(itertools.islice(make_loader(stream.folder, epoch=0, **loader_args), 4))
    assert all(batch["truncated"] == 0 for batch in seen)  # whole captions, not just their end
    trainer.model.eval()
    before = (_caption_loss(trainer, seen, permute=False), _caption_loss(trainer, seen, permute=True))
    assert before[0] == before[1]  # zero-init gates: the image changes nothing yet
    for _ in range(STEPS):
        train_step(trainer, measure=False)
    trainer.model.eval()
    right, shuffled = _caption_loss(trainer, seen, permute=False), _caption_loss(trainer, seen, permute=True)
    assert right < before[0]  # it learns the captions' language either way
    assert shuffled - right > 0.1, (right, shuffled, trainer.model.gate_values())
