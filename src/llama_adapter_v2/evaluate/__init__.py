"""Evaluation: what the held-out data is (``heldout``), generating and scoring it (``scoring``,
with the metric modules), grounded questions, ablation tables, and the run that ties them
together and writes and logs the results (``run``). Models and generation come from ``infer``.
"""
