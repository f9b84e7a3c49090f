"""``lav2 fold``: fold an adapter's bias, scale and LoRA into its base weights for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llama_adapter_v2.cli.terminal import errors_exit


def fold(
    adapter: Annotated[
        Path, typer.Option(help="Adapter folder written by save_adapter (adapter.json inside)")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (created)")],
) -> None:
    """Fold ADAPTER into its base. No prompts: OUT is a stock transformers Llama folder.
    With prompts: OUT/base is the folded Llama and OUT an adapter folder keeping prompts and gates."""
    from llama_adapter_v2.infer import loading  # noqa: PLC0415 - lazy: CLI starts without torch
    from llama_adapter_v2.model import build, checkpoint  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.model.fold import QuantizedBaseFoldError, export_folded  # noqa: PLC0415 - lazy

    console = Console(stderr=True)
    with errors_exit(FileNotFoundError, checkpoint.AdapterMismatchError, build.BaseModelError), \
            console.status(f"building the base of {adapter} and loading the adapter"):
        model, cfg = loading.model_from_adapter(adapter)
    with errors_exit(QuantizedBaseFoldError), console.status(f"folding into {out}"):
        stock = export_folded(model, out, tokenizer_from=cfg.model.base.path)
    if stock == out:
        typer.echo(
            f"{out}: stock transformers Llama (attention_bias and mlp_bias on); no project code needed"
        )
    else:
        typer.echo(f"{out}: adapter with prompts and gates over the folded base {stock}")
