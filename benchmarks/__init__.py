"""Side-by-side benchmarks of the project against peers (see benchmarks/README.md).

Nothing heavy is imported here: the LitGPT case runs this package from its own venv,
where only the standard library and torch are guaranteed.
"""
