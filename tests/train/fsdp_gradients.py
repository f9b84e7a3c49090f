"""Run by torchrun from test_train_fsdp: the same batches through DDP and through each variant, every rank.

The variants are FSDP2, FSDP2 with activation checkpointing, DDP with activation checkpointing
(each against plain DDP) and DDP with checkpointing over an nf4 base (against DDP over the same
nf4 base). Writes, per variant and task, the largest gradient difference of any adapter tensor
relative to that tensor's gradient norm (the variant's whole gradient against the reference's
all-reduced one) and how many tensors had a gradient, to argv[2].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_project import tiny_config

from llama_adapter_v2.model.sharding import full_tensor
from llama_adapter_v2.train.distributed import init_distributed, shutdown
from llama_adapter_v2.train.schedule import GROUP_OF_TASK
from llama_adapter_v2.train.trainer import Trainer

CHECKPOINTED = "training.activation_checkpointing=true"
NF4 = "model.base.quantize=nf4"
# variant -> (overrides of both the DDP reference and the variant, overrides of the variant only)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fsdp": ((), ("training.distributed.strategy=fsdp",)),
    "fsdp_checkpointed": ((), ("training.distributed.strategy=fsdp", CHECKPOINTED)),
    "ddp_checkpointed": ((), (CHECKPOINTED,)),
    "ddp_nf4_checkpointed": ((NF4,), (CHECKPOINTED,)),
}


def main(config: Path, out: Path) -> None:
    ctx = init_distributed(tiny_config(config, out.parent / "ddp").training)
    report: dict[str, dict[str, float]] = {}
    compared: dict[str, dict[str, int]] = {}
    for variant, (shared, own) in VARIANTS.items():
        # a new reference for each: its streams start where the variant's do
        reference = Trainer(tiny_config(config, out.parent / "ddp", "training.batch_size=2", *shared), ctx)
        variant_cfg = tiny_config(config, out.parent / variant, "training.batch_size=2", *shared, *own)
        trainer = Trainer(variant_cfg, ctx)
        report[variant], compared[variant] = _compare(reference, trainer)
        del reference, trainer  # before shutdown: see distributed.shutdown
    if ctx.is_main:
        out.write_text(json.dumps({"difference": report, "tensors": compared}))
    shutdown(ctx)


def _compare(reference: Trainer, other: Trainer) -> tuple[dict[str, float], dict[str, int]]:
    """Both trainers are new, their streams at the start: they see the same batches."""
    report: dict[str, float] = {}
    compared: dict[str, int] = {}
    for task in ("caption", "instruction", "instruction"):
        worst = 0.0
        for trainer in (reference, other):
            trainer.model.set_trainable([GROUP_OF_TASK[task]])
            batch = trainer.streams[task].next_batch()
            trainer.wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                            batch.get("has_image")).backward()
        pairs = zip(reference.model.adapter_named_parameters(), other.model.adapter_named_parameters(),
                    strict=True)
        for (name, mine), (_, theirs) in pairs:
            if mine.grad is None:
                assert theirs.grad is None, name
                continue
            gathered = full_tensor(theirs.grad)
            scale = float(mine.grad.norm()) or 1.0
            worst = max(worst, float((gathered - mine.grad).abs().max()) / scale)
            mine.grad, theirs.grad = None, None
            compared[task] = compared.get(task, 0) + 1
        report[task] = max(worst, report.get(task, 0.0))
    return report, compared


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
