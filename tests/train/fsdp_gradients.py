"""Run by torchrun from test_train_fsdp: the same batches through DDP and FSDP2 on every rank.

Writes, per task, the largest gradient difference of any adapter tensor relative to that
tensor's gradient norm (FSDP's gathered gradient against DDP's all-reduced one) and how many
tensors had a gradient, to argv[2].
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


def main(config: Path, out: Path) -> None:
    reference_cfg = tiny_config(config, out.parent / "ddp", "training.batch_size=2")
    ctx = init_distributed(reference_cfg.training)
    reference = Trainer(reference_cfg, ctx)
    sharded = Trainer(tiny_config(config, out.parent / "fsdp", "training.batch_size=2",
                                  "training.distributed.strategy=fsdp"), ctx)
    report: dict[str, float] = {}
    compared: dict[str, int] = {}
    for task in ("caption", "instruction", "instruction"):
        worst = 0.0
        for trainer in (reference, sharded):
            trainer.model.set_trainable([GROUP_OF_TASK[task]])
            batch = trainer.streams[task].next_batch()
            trainer.wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                            batch.get("has_image")).backward()
        pairs = zip(reference.model.adapter_named_parameters(), sharded.model.adapter_named_parameters(),
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
    if ctx.is_main:
        out.write_text(json.dumps({"difference": report, "tensors": compared}))
    shutdown(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
