"""The demo's CLIP tower is trained contrastively on training captions and loads as the model's tower."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_project import tiny_config
from transformers import AutoTokenizer, CLIPModel

from llama_adapter_v2.model.build import build_clip
from llama_adapter_v2.train.demo_clip import CLIP_SPECIAL_TOKENS, train_demo_clip

STEPS = 40


def test_demo_clip_learns_and_its_folder_is_the_towers(tiny_project: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_project, tmp_path / "run", f"model.vision.path={tmp_path / 'demo-clip'}",
                      f"training.demo_clip.steps={STEPS}", "training.demo_clip.batch_size=8",
                      "training.demo_clip.lr=3e-3", "training.demo_clip.warmup_steps=4")
    result = train_demo_clip(cfg)
    assert result.n_images >= 8 and len(result.losses) == STEPS
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)  # the contrastive loss falls (log 8 = 2.08 at chance)
    assert sum(result.accuracies[-5:]) / 5 > 1 / 8  # image -> its caption above chance in the batch

    folder = result.path
    saved = CLIPModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.eos_token_id == 3 and tokenizer.eos_token == CLIP_SPECIAL_TOKENS["eos_token"]
    assert saved.config.text_config.eos_token_id == 3  # not 2: transformers would pool at the largest id
    tower = build_clip(cfg.model.vision, device=torch.device("cpu"), dtype=torch.float32)
    own = saved.state_dict()
    for name, value in tower.state_dict().items():  # every tower weight is the trained one, exactly
        assert torch.equal(value, own[name]), name
    assert not any(name.startswith("text_model") for name in tower.state_dict())
