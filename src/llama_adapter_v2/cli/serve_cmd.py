"""``lav2 serve``: an OpenAI-compatible chat endpoint and a chat page for one model (serve/)."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Annotated

import typer

from llama_adapter_v2.cli.eval_cmd import ModelSource
from llama_adapter_v2.cli.terminal import errors_exit, log_to_stderr

log = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    import uvicorn  # noqa: PLC0415 - lazy: CLI starts without torch
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - lazy, as above

    from llama_adapter_v2.registry.requests import ImageLimits  # noqa: PLC0415 - lazy, as above
    from llama_adapter_v2.serve import api, conversation, served  # noqa: PLC0415 - lazy, as above

    log_to_stderr()
    api_key = os.environ.get(api.API_KEY_VARIABLE) or None
    if not _loopback(host) and api_key is None:
        log.warning("serving on %s without %s: anyone who reaches it can use the model",
                    host, api.API_KEY_VARIABLE)
    with errors_exit(FileNotFoundError, MlflowException):
        loaded, card = served.load_served(model, tracking_uri=tracking_uri, name=name)
    body_bytes = int(max_body_mb * api.MIB)
    options = api.ServeOptions(
        api_key=api_key, max_body_bytes=body_bytes,
        image_limits=ImageLimits(max_bytes=body_bytes, max_side=max_image_side, max_pixels=max_image_pixels),
        defaults=conversation.Defaults(max_tokens=max_tokens), max_batch=max_batch, max_waiting=max_waiting,
    )
    log.info("serving %s (version %s, alias %s) at http://%s:%d/", card.id, card.version, card.alias,
             host, port)
    uvicorn.run(api.create_app(loaded, card, options), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=5)
