"""Training: the run (``loop.train``), its schedule, state, step and resume; checkpoints, optimizers,
tracking, distribution, and the demo's base and CLIP stages.

Import the submodules (``llama_adapter_v2.train.loop.train``, ``...demo_base.train_demo_base``);
this package module stays empty so that importing a light submodule loads nothing else.
"""
