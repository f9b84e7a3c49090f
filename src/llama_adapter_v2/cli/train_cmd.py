"""``lav2 train``, ``demo-base``, ``demo-clip`` and ``sync-metrics`` (torch and mlflow load inside)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from llama_adapter_v2.cli.config_cmd import ConfigFile, Overrides, load_or_exit


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def train(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint")
    ] = False,
) -> None:
    """Train the adapter of CONFIG (run under `torchrun --nproc_per_node N` for DDP)."""
    _log_to_stderr()
    from llama_adapter_v2.store import TrackingUnavailableError
    from llama_adapter_v2.train.loop import train as run_training

    cfg = load_or_exit(config, overrides)
    try:
        result = run_training(cfg, resume=resume)
    except (TrackingUnavailableError, FileExistsError) as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3) from None
    summary = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.final_metrics.items()))
    typer.echo(f"trained {len(result.losses)} steps in {result.seconds:.1f}s; run {result.run_id}; {summary}")
    typer.echo(f"adapter: {result.adapter_dir}  checkpoints: {result.checkpoint_dir}")


def demo_base(config: ConfigFile, overrides: Overrides = None) -> None:
    """Train the demo's tiny frozen base LM and tokenizer on the demo text (writes model.base.path)."""
    _log_to_stderr()
    from llama_adapter_v2.train.demo_base import train_demo_base

    cfg = load_or_exit(config, overrides)
    result = train_demo_base(cfg)
    typer.echo(
        f"demo base: {result.n_texts} texts, {len(result.losses)} steps in {result.seconds:.1f}s, "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {result.path}"
    )


def demo_clip(config: ConfigFile, overrides: Overrides = None) -> None:
    """Train the demo's tiny CLIP tower contrastively on the training captions (writes model.vision.path)."""
    _log_to_stderr()
    from llama_adapter_v2.train.demo_clip import train_demo_clip

    cfg = load_or_exit(config, overrides)
    result = train_demo_clip(cfg)
    typer.echo(
        f"demo CLIP: {result.n_images} images, {result.n_captions} captions, {len(result.losses)} steps in "
        f"{result.seconds:.1f}s, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, in-batch "
        f"image->caption accuracy {result.accuracies[-1]:.2f}; saved to {result.path}"
    )


def sync_metrics(config: ConfigFile, overrides: Overrides = None) -> None:
    """Replay tracking records that a run could not deliver (spill files) to the tracking server."""
    _log_to_stderr()
    from llama_adapter_v2.store import TrackingUnavailableError
    from llama_adapter_v2.train.tracking import sync_spills

    cfg = load_or_exit(config, overrides)
    try:
        outcome = sync_spills(cfg)
    except TrackingUnavailableError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3) from None
    for path, (delivered, remaining) in outcome.items():
        typer.echo(f"{path}: {delivered} delivered, {remaining} remaining")
    if any(remaining for _, remaining in outcome.values()):
        raise typer.Exit(code=1)
