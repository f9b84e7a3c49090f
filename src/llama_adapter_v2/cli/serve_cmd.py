"""``lav2 serve``: an OpenAI-compatible chat endpoint and a chat page for one model (serve/)."""

from __future__ import annotations

from typing import Annotated

import typer

from llama_adapter_v2.cli.eval_cmd import ModelSource
from llama_adapter_v2.cli.terminal import errors_exit, log_to_stderr


def serve(
    *,
    model: ModelSource,
    host: Annotated[str, typer.Option("--host", help="address to bind; 0.0.0.0 exposes it to the network")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    name: Annotated[str | None, typer.Option("--name", help="the id requests name; default: --model "
                                             "without models:/")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri",
                     help="MLflow store of models:/ and runs:/ (default: MLFLOW_TRACKING_URI, else "
                     "the project's)"),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="answer length when a request "
                                            "gives none")] = 256,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="greedy requests answered together")
                         ] = 8,
    max_waiting: Annotated[int, typer.Option("--max-waiting", min=1, help="queued requests before 503")] = 64,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001)] = 20.0,
    max_image_side: Annotated[int, typer.Option("--max-image-side", min=1)] = 4096,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", min=1)] = 4096 * 4096,
) -> None:
    """Serve a model (adapter folder, runs:/<id> or models:/name@alias) at /v1/chat/completions and /.

    With LAV2_API_KEY set, every /v1 request needs "Authorization: Bearer <key>".
    """
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - lazy: CLI starts without torch

    from llama_adapter_v2.serve.run import ServeSettings, serve_model  # noqa: PLC0415 - lazy, as above

    log_to_stderr()
    settings = ServeSettings(
        host=host, port=port, name=name, tracking_uri=tracking_uri, max_tokens=max_tokens,
        max_batch=max_batch, max_waiting=max_waiting, max_body_mb=max_body_mb, max_image_side=max_image_side,
        max_image_pixels=max_image_pixels,
    )
    with errors_exit(FileNotFoundError, MlflowException):
        serve_model(model, settings)
