"""``lav2 evaluate``, ``lav2 generate`` and ``lav2 chat``.

Each command imports the library when it runs (marked ``lazy``): ``lav2 --help`` starts without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from PIL import Image

from llama_adapter_v2.cli.terminal import ConfigFile, Overrides, errors_exit, load_or_exit, log_to_stderr
from llama_adapter_v2.config.schema import ExpertConfig

ModelSource = Annotated[
    str,
    typer.Option("--model", help="adapter folder (e.g. artifacts/train/demo/adapter) or models:/name@alias"),
]
ImagePath = Annotated[
    Path | None, typer.Option("--image", exists=True, dir_okay=False, help="image file (RGB-converted)")
]
Experts = Annotated[
    list[str] | None,
    typer.Option("--expert", help="image-to-text expert for the input slot: ocr | caption (repeatable)"),
]
CaptionModel = Annotated[
    str | None, typer.Option("--caption-model", help="caption expert's model (folder or models:/...)")
]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", min=1)]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
Seed = Annotated[int, typer.Option("--seed")]


def evaluate(
    config: ConfigFile,
    *,
    overrides: Overrides = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="adapter folder; default <training.output_dir>/adapter")
    ] = None,
    zero_init: Annotated[
        bool, typer.Option("--zero-init", help="evaluate the untrained (zero-init) adapter: the baseline")
    ] = False,
    choices: Annotated[
        list[Path] | None,
        typer.Option("--choices", exists=True, dir_okay=False, help="MMLU-layout JSONL (repeatable)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="default <training.output_dir>/eval (--zero-init: .../eval-zero-init)"),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="training run the scores belong to (logged in a child run of it); "
                     "default: the checkpoint's"),
    ] = None,
    max_images: Annotated[int | None, typer.Option("--max-images", min=1)] = None,
    max_instructions: Annotated[int | None, typer.Option("--max-instructions", min=1)] = None,
) -> None:
    """Score an adapter on the held-out captions and instructions; write eval/metrics.json."""
    from llama_adapter_v2.evaluate import report, run  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.train import checkpoint  # noqa: PLC0415 - lazy: CLI starts without torch

    log_to_stderr()
    cfg = load_or_exit(config, overrides)
    adapter_dir = None if zero_init else adapter or cfg.training.output_dir / "adapter"
    if run_id is None and cfg.tracking.enabled and not zero_init:
        run_id = checkpoint.recorded_run_id(cfg.training.output_dir / "checkpoints")
    options = run.EvalOptions(
        choice_files=tuple(choices or ()), out_dir=out, run_id=run_id,
        max_images=max_images, max_instructions=max_instructions,
    )
    with errors_exit(FileNotFoundError):
        metrics = run.evaluate(cfg, adapter_dir, options)
    typer.echo(report.metrics_table(metrics))
    typer.echo(f"written to {out or run.eval_dir(cfg, zero_init)}")


def _expert_configs(names: list[str] | None, caption_model: str | None) -> list[ExpertConfig]:
    kinds: list[Literal["caption", "ocr"]] = []
    for name in names or []:
        if name not in ("caption", "ocr"):
            raise typer.BadParameter(f"unknown expert {name!r}: choose ocr or caption", param_hint="--expert")
        kinds.append(name)  # type: ignore[arg-type]
    return [ExpertConfig(kind=kind, model=caption_model) for kind in kinds]


def _image(path: Path | None) -> Image.Image | None:
    if path is None:
        return None
    with Image.open(path) as raw:
        return raw.convert("RGB")


def generate(
    *,
    model: ModelSource,
    prompt: Annotated[str | None, typer.Option("--prompt", help="the instruction")] = None,
    image: ImagePath = None,
    context: Annotated[str, typer.Option("--input", help="input for the template's input slot")] = "",
    requests: Annotated[
        Path | None,
        typer.Option("--requests", exists=True, dir_okay=False,
                     help='JSONL of {"prompt", "image"?, "input"?, "id"?}: answered in one model load'),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSONL answers for --requests")] = None,
    image_root: Annotated[
        Path | None,
        typer.Option("--image-root", file_okay=False, help="images of --requests resolve here (default: "
                     "the requests file's folder); paths outside it are refused"),
    ] = None,
    expert: Experts = None,
    caption_model: CaptionModel = None,
    max_new_tokens: MaxNew = 64,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
) -> None:
    """Answer one instruction (about an optional image), or every line of --requests into --out."""
    from llama_adapter_v2 import experts  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.infer import batch, expert_text, generation, loading  # noqa: PLC0415 - lazy, as above

    if (prompt is None) == (requests is None):
        raise typer.BadParameter("give --prompt (one answer) or --requests with --out (a file of them)")
    if requests is not None and out is None:
        raise typer.BadParameter("--requests needs --out for the answers", param_hint="--out")
    with errors_exit(FileNotFoundError):
        loaded = loading.load_for_inference(model)
    settings = generation.GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, seed=seed)
    if requests is not None and out is not None:
        answered, failed = batch.answer_requests(
            loaded.model, loaded.tokenizer, requests, out, settings=settings, image_root=image_root
        )
        typer.echo(f"{answered} answered, {failed} with an error line; written to {out}")
        return
    assert prompt is not None
    picture = _image(image)
    with errors_exit(experts.ExpertUnavailableError):
        chosen = experts.build_experts(_expert_configs(expert, caption_model))
    slot = expert_text.expert_context(chosen, picture, context)
    request = generation.instruction_prompt(prompt, slot, picture)
    [text] = generation.generate_texts(loaded.model, loaded.tokenizer, [request], settings)
    typer.echo(text)


def chat(
    *,
    model: ModelSource,
    image: ImagePath = None,
    expert: Experts = None,
    caption_model: CaptionModel = None,
    max_new_tokens: MaxNew = 64,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
) -> None:
    """Multi-turn chat in the terminal (empty line or Ctrl-D ends it); history trimmed to fit."""
    from llama_adapter_v2 import experts  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.infer import chat, generation, loading  # noqa: PLC0415 - lazy, as above

    with errors_exit(FileNotFoundError):
        loaded = loading.load_for_inference(model)
    with errors_exit(experts.ExpertUnavailableError):
        chosen = experts.build_experts(_expert_configs(expert, caption_model))
    settings = generation.GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, seed=seed)
    session = chat.ChatSession(loaded.model, loaded.tokenizer, image=_image(image), experts=chosen,
                               settings=settings)
    typer.echo("Chat started (empty line or Ctrl-D to end).", err=True)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            result = session.ask(question)
        except chat.ContextTooLongError as err:
            typer.secho(str(err), fg=typer.colors.RED, err=True)
            continue
        dropped = (len(session.history) - 2 - len(result.kept_history)) // 2
        note = f"  [{dropped} oldest exchange(s) left out to fit the context]" if dropped else ""
        typer.echo(f"assistant> {result.text}{note}")
