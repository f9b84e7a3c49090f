"""Training: joint training on disjoint groups (``loop``), checkpoints, optimizers, tracking, demo base.

Import the submodules (``llama_adapter_v2.train.loop.train``, ``...demo_base.train_demo_base``);
this package module stays import-light so the CLI can list commands without torch.
"""
