"""Prefect flow that serves the registered model's champion (``prefect.yaml``: ``serve-champion``).

Thin: it names ``models:/<tracking.registered_model>@<alias>`` in the config's tracking store and
runs the library's server, the one ``lav2 serve`` runs. The flow run lasts as long as the server;
the alias is pinned to its version at start-up, so a new champion is served by a new flow run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

import llama_adapter_v2  # noqa: F401 - applies the offline environment first
from llama_adapter_v2.config import load_config
from llama_adapter_v2.serve.run import ServeSettings, serve_model
from llama_adapter_v2.store import REGISTRY_PREFIX, tracking_uri


@flow(name="serve-champion", log_prints=True)
def serve_champion(config_path: str, overrides: list[str] | None = None, alias: str = "champion",
                   host: str = "127.0.0.1", port: int = 8000) -> None:
    cfg = load_config(config_path, overrides or [])
    source = f"{REGISTRY_PREFIX}{cfg.tracking.registered_model}@{alias}"
    get_run_logger().info("serving %s from %s on %s:%d", source, tracking_uri(cfg), host, port)
    serve_model(source, ServeSettings(host=host, port=port, tracking_uri=tracking_uri(cfg)))
