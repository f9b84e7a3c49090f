"""Entry point of ``lav2``.

Only typer and the config layer are imported at module level, so ``lav2 --help`` and
``lav2 config ...`` stay fast; commands that need torch import it when they run.
"""

from __future__ import annotations

import typer

import llama_adapter_v2  # noqa: F401 - applies the offline environment first
from llama_adapter_v2.cli import (
    ablate_cmd,
    config_cmd,
    data_cmd,
    eval_cmd,
    fold_cmd,
    params_cmd,
    pipeline_cmd,
    reference_cmd,
    registry_cmd,
    serve_cmd,
    train_cmd,
)

app = typer.Typer(
    name="lav2",
    help="LLaMA-Adapter V2: visual instruction tuning on a frozen Llama and CLIP tower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(data_cmd.app, name="data")
app.add_typer(reference_cmd.app, name="reference")
app.command("register")(registry_cmd.register)
app.command("promote")(registry_cmd.promote)
app.command("pipeline")(pipeline_cmd.pipeline)
app.command("params")(params_cmd.params)
app.command("fold")(fold_cmd.fold)
app.command("train")(train_cmd.train)
app.command("demo-base")(train_cmd.demo_base)
app.command("demo-clip")(train_cmd.demo_clip)
app.command("fit-answers")(train_cmd.fit_answers)
app.command("sync-metrics")(train_cmd.sync_metrics)
app.command("evaluate")(eval_cmd.evaluate)
app.command("generate")(eval_cmd.generate)
app.command("chat")(eval_cmd.chat)
app.command("ablate")(ablate_cmd.ablate)
app.command("serve")(serve_cmd.serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
