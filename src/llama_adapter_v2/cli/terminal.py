"""What every command shares: the config argument and ``--set`` overrides, log lines on stderr,
and errors the user can fix shown as one red line and an exit code instead of a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from llama_adapter_v2.config import Config, ConfigError, load_config

ConfigFile = Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/demo.yaml")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: --set training.steps=20 (repeatable)"),
]


def load_or_exit(path: Path, overrides: list[str] | None) -> Config:
    with errors_exit(ConfigError):
        return load_config(path, overrides or ())


def log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@contextmanager
def errors_exit(*errors: type[Exception], code: int = 2) -> Iterator[None]:
    """Within the block, ``errors`` print their message in red and end the command with ``code``."""
    try:
        yield
    except errors as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=code) from None
