"""The served model and what it is: the id clients name, the registered version and alias, the run.

A ``models:/name@alias`` source is pinned to the version the alias names at start-up, and that
version is what is loaded and shown: if the alias moves while the server runs, the page and
``/v1/models`` still say which weights answer. Restart the server to serve the new champion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llama_adapter_v2.infer.loading import LoadedModel, load_for_inference
from llama_adapter_v2.store import REGISTRY_PREFIX, RUN_PREFIX, PinnedVersion, pinned_version


@dataclass(frozen=True)
class ModelCard:
    """``id`` is what requests name in ``model``: the source as given, without ``models:/``."""

    id: str
    source: str
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    created: int = 0

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's model object, with the registry's version and alias beside it."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "lav2",
                "version": self.version, "alias": self.alias, "run_id": self.run_id, "source": self.source}


def model_id(source: str) -> str:
    return source.removeprefix(REGISTRY_PREFIX) if source.startswith(REGISTRY_PREFIX) else source


def _run_id(source: str, pinned: PinnedVersion | None) -> str | None:
    if pinned is not None:
        return pinned.run_id
    return source.removeprefix(RUN_PREFIX).split("/")[0] if source.startswith(RUN_PREFIX) else None


def load_served(source: str, *, tracking_uri: str | None = None, name: str | None = None,
                device: str = "cpu") -> tuple[LoadedModel, ModelCard]:
    """The model of a folder, a run or a registered version (an alias pinned to its version now)."""
    pinned = pinned_version(source, tracking_uri)
    loaded = load_for_inference(pinned.uri if pinned else source, tracking_uri=tracking_uri, device=device)
    card = ModelCard(
        id=name or model_id(source), source=source, version=pinned.version if pinned else None,
        alias=pinned.alias if pinned else None, run_id=_run_id(source, pinned), created=int(time.time()),
    )
    return loaded, card
