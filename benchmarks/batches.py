"""The synthetic batches every training case consumes (torch only, shared with the LitGPT venv).

Random token ids with a fixed seed; the first part of each sequence is prompt (label -100)
and the rest response, as in instruction data, so a model that projects only labelled
positions onto the vocabulary can show it. Labels follow the transformers convention: aligned
with the inputs, shifted inside the loss.
"""

from __future__ import annotations

import torch

from benchmarks.spec import Spec


def text_batch(spec: Spec) -> dict[str, torch.Tensor]:
    work = spec.workload
    generator = torch.Generator().manual_seed(work.seed)
    input_ids = torch.randint(3, spec.llama.vocab_size, (work.batch_size, work.seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : work.seq_len - work.label_positions] = -100
    return {
        "input_ids": input_ids.to(work.device),
        "attention_mask": torch.ones_like(input_ids).to(work.device),
        "labels": labels.to(work.device),
    }


def image_batch(spec: Spec, dtype: torch.dtype) -> torch.Tensor:
    """Already-normalised images (B, 3, H, W), as the model's image_transform would give."""
    generator = torch.Generator().manual_seed(spec.workload.seed + 1)
    size = spec.vision.image_size
    images = torch.randn(spec.workload.batch_size, 3, size, size, generator=generator)
    return images.to(device=spec.workload.device, dtype=dtype)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over labelled positions (for models that return only logits)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def prompt_ids(spec: Spec) -> torch.Tensor:
    """Generation prompts (B, gen_prompt_tokens)."""
    work = spec.workload
    generator = torch.Generator().manual_seed(work.seed + 2)
    ids = torch.randint(
        3, spec.llama.vocab_size, (work.batch_size, work.gen_prompt_tokens), generator=generator
    )
    return ids.to(work.device)
