"""``lav2 train``, ``demo-base``, ``demo-clip`` and ``sync-metrics``.

Each command imports the library when it runs (marked ``lazy``): ``lav2 --help`` starts without torch.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, errors_exit, load_or_exit, log_to_stderr

if TYPE_CHECKING:
    from llama_adapter_v2.config import Config

# The work pool's job variables set it (prefect.yaml); it overrides the config's gpu_pool.gpus.
PROCESSES_ENV = "LAV2_GPUS"


def training_processes(cfg: Config, visible_gpus: int) -> int:
    """How many processes this training wants: ``LAV2_GPUS`` when set, else the config's
    ``orchestration.gpu_pool.gpus`` on a machine that has that many GPUs, else one. So a gpu-pool
    worker and ``dvc repro`` on the same machine train with the same world size, and the 8-GPU
    configs do not spawn 8 processes on a laptop."""
    if value := os.environ.get(PROCESSES_ENV):
        return max(int(value), 1)
    wanted = cfg.orchestration.gpu_pool.gpus
    return wanted if 1 < wanted <= visible_gpus and cfg.training.device != "cpu" else 1


def torchrun_command(arguments: list[str], processes: int) -> list[str]:
    """The same ``lav2`` command line under torchrun, one process per GPU (gloo on CPU)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    lav2 = shutil.which("lav2") or str(Path(sys.executable).with_name("lav2"))
    return [torchrun, "--standalone", f"--nproc-per-node={processes}", "--no-python", lav2, *arguments]


def train(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint")
    ] = False,
) -> None:
    """Train the adapter of CONFIG; with LAV2_GPUS=N (or N GPUs the config asks for) under torchrun."""
    from llama_adapter_v2 import store  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.train import loop  # noqa: PLC0415 - lazy, as above

    log_to_stderr()
    cfg = load_or_exit(config, overrides)
    if "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        import torch  # noqa: PLC0415 - lazy, as above

        if (processes := training_processes(cfg, torch.cuda.device_count())) > 1:
            command = torchrun_command(sys.argv[1:], processes)
            typer.echo(f"launching {' '.join(command)}", err=True)
            os.execv(command[0], command)
    with errors_exit(store.TrackingUnavailableError, FileExistsError, code=3):
        result = loop.train(cfg, resume=resume)
    summary = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.final_metrics.items()))
    typer.echo(f"trained {len(result.losses)} steps in {result.seconds:.1f}s; run {result.run_id}; {summary}")
    typer.echo(f"adapter: {result.adapter_dir}  checkpoints: {result.checkpoint_dir}")


def demo_base(config: ConfigFile, overrides: Overrides = None) -> None:
    """Train the demo's tiny frozen base LM and tokenizer on the demo text (writes model.base.path)."""
    from llama_adapter_v2.train.demo_base import train_demo_base  # noqa: PLC0415 - lazy: CLI starts without torch

    log_to_stderr()
    result = train_demo_base(load_or_exit(config, overrides))
    typer.echo(
        f"demo base: {result.n_texts} texts, {len(result.losses)} steps in {result.seconds:.1f}s, "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {result.path}"
    )


def demo_clip(config: ConfigFile, overrides: Overrides = None) -> None:
    """Train the demo's tiny CLIP tower contrastively on the training captions (writes model.vision.path)."""
    from llama_adapter_v2.train.demo_clip import train_demo_clip  # noqa: PLC0415 - lazy: CLI starts without torch

    log_to_stderr()
    result = train_demo_clip(load_or_exit(config, overrides))
    typer.echo(
        f"demo CLIP: {result.n_images} images, {result.n_captions} captions, {len(result.losses)} steps in "
        f"{result.seconds:.1f}s, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, in-batch "
        f"image->caption accuracy {result.accuracies[-1]:.2f}; saved to {result.path}"
    )


def sync_metrics(config: ConfigFile, overrides: Overrides = None) -> None:
    """Replay tracking records that a run could not deliver (spill files) to the tracking server."""
    from llama_adapter_v2 import store  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.train import tracking  # noqa: PLC0415 - lazy, as above

    log_to_stderr()
    cfg = load_or_exit(config, overrides)
    with errors_exit(store.TrackingUnavailableError, code=3):
        outcome = tracking.sync_spills(cfg)
    for path, (delivered, remaining) in outcome.items():
        typer.echo(f"{path}: {delivered} delivered, {remaining} remaining")
    if any(remaining for _, remaining in outcome.values()):
        raise typer.Exit(code=1)


def fit_answers(
    config: ConfigFile,
    overrides: Overrides = None,
    *,
    attributes: Annotated[str, typer.Option(help="Grounded questions to ask, comma-separated")] = (
        "colour,shape,place,count,background"
    ),
    steps: Annotated[int, typer.Option(help="Optimizer steps")] = 500,
    lr: Annotated[float, typer.Option(help="Learning rate")] = 3e-3,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (momentum 0.9)")] = "adamw",
    groups: Annotated[str, typer.Option(help="Parameter groups that train: visual, language or both")] = (
        "visual,language"
    ),
    batch_size: Annotated[int, typer.Option(help="Questions per step")] = 16,
    eval_every: Annotated[int, typer.Option(help="Test the fixed scenes every N steps")] = 100,
    one_shape: Annotated[bool, typer.Option("--one-shape", help="Only scenes of one shape")] = False,
    seed: Annotated[int, typer.Option(help="Seeds the adapter's initialisation and the scenes drawn")] = 0,
    adapter: Annotated[Path | None, typer.Option(help="Start from this adapter (default: zero-init)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the accuracy history here (JSON)")] = None,
) -> None:
    """Fit the adapter on answer words about freshly drawn demo scenes: what the visual path can learn
    to read, question by question, free of the demo's data mix (README "What the demo model sees")."""
    import json  # noqa: PLC0415 - lazy: CLI starts without torch

    import torch  # noqa: PLC0415 - lazy, as above

    from llama_adapter_v2.infer.loading import inference_model  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.model.build import load_tokenizer  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.train.answer_fit import AnswerFitError, AnswerFitSettings  # noqa: PLC0415 - lazy
    from llama_adapter_v2.train.answer_fit import fit_answers as run_fit  # noqa: PLC0415 - lazy, as above

    cfg = load_or_exit(config, overrides)
    settings = AnswerFitSettings(
        attributes=_names(attributes), steps=steps, lr=lr, optimizer=optimizer,  # type: ignore[arg-type]
        groups=_names(groups), batch_size=batch_size, eval_every=eval_every,  # type: ignore[arg-type]
        one_shape=one_shape, seed=seed, image_size=cfg.data.demo.image_size if cfg.data.demo else 64,
    )
    with errors_exit(AnswerFitError):
        settings.check()
        torch.manual_seed(seed)
        model = inference_model(cfg, adapter)
        history = run_fit(model, load_tokenizer(cfg), settings, report=_print_accuracy)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": settings.__dict__, "history": history}, indent=1) + "\n")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _print_accuracy(row: dict[str, float]) -> None:
    scores = "  ".join(f"{name} {value:.2f}" for name, value in row.items() if name != "step")
    typer.echo(f"step {int(row['step']):>5}  {scores}")
