"""Run by torchrun from test_train_distributed: ``loop.train`` for 2 steps, counting at its
``shutdown`` how many DDP modules are still alive (printed per rank).

One alive there outlives the process group, and its reducer then destroys the group from C++
with the GIL held, which deadlocked rank 1 about one run in four (see ``distributed.shutdown``).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from tiny_project import tiny_config
from torch import nn

from llama_adapter_v2.train import loop
from llama_adapter_v2.train.distributed import DistContext, shutdown


def counting_shutdown(ctx: DistContext) -> None:
    gc.collect()
    alive = sum(isinstance(obj, nn.parallel.DistributedDataParallel) for obj in gc.get_objects())
    print(f"rank {ctx.rank}: DDP modules alive at shutdown: {alive}", flush=True)
    shutdown(ctx)


if __name__ == "__main__":
    loop.shutdown = counting_shutdown  # the loop's own teardown, observed
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    loop.train(tiny_config(config, out, "training.batch_size=2", "training.steps=2"))
