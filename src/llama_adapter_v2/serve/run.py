"""Start the server for one model: what ``lav2 serve`` and the ``serve-champion`` flow both run."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

import uvicorn

from llama_adapter_v2.registry.requests import ImageLimits
from llama_adapter_v2.serve import api, conversation, served

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Where to listen and how much to take; the API key comes from ``LAV2_API_KEY`` only."""

    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None
    tracking_uri: str | None = None
    max_tokens: int = 256
    max_batch: int = 8
    max_waiting: int = 64
    max_body_mb: float = 20.0
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_model(source: str, settings: ServeSettings) -> None:
    """Load ``source`` (adapter folder, runs:/<id>, models:/name@alias) and serve it until stopped."""
    api_key = os.environ.get(api.API_KEY_VARIABLE) or None
    if not is_loopback(settings.host) and api_key is None:
        log.warning("serving on %s without %s: anyone who reaches it can use the model",
                    settings.host, api.API_KEY_VARIABLE)
    loaded, card = served.load_served(source, tracking_uri=settings.tracking_uri, name=settings.name)
    body_bytes = int(settings.max_body_mb * api.MIB)
    options = api.ServeOptions(
        api_key=api_key, max_body_bytes=body_bytes,
        image_limits=ImageLimits(max_bytes=body_bytes, max_side=settings.max_image_side,
                                 max_pixels=settings.max_image_pixels),
        defaults=conversation.Defaults(max_tokens=settings.max_tokens), max_batch=settings.max_batch,
        max_waiting=settings.max_waiting,
    )
    log.info("serving %s (version %s, alias %s) at http://%s:%d/", card.id, card.version, card.alias,
             settings.host, settings.port)
    uvicorn.run(api.create_app(loaded, card, options), host=settings.host, port=settings.port,
                log_level="info", timeout_graceful_shutdown=5)
