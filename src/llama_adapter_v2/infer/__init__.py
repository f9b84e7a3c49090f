"""Inference: a model for inference (from an adapter folder, a training run or a registered
version), generation, multi-turn chat, batch answering, continuation likelihoods and the
held-out loss. Evaluation, the registry's served model, the experts and the CLI all call it.
"""
