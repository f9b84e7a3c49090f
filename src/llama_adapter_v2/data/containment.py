"""Paths named by data must stay inside the folder configured for them.

A COCO ``file_name``, a LLaVA ``image`` or an image path in a serving request is data, not a
trusted path: ``../../x.png``, an absolute path or a symlink in the image folder pointing elsewhere
would make the pipeline read files the data set does not own. ``resolve_inside`` resolves the path,
symlinks included, and refuses it unless the result lies inside the root (itself resolved); the
caller then never opens it. Only ``realpath``'s lstat/readlink calls touch the path: no file is
opened to decide.

What this cannot see: a hard link inside the root to a file outside it (it *is* a file of the
root), and a symlink swapped between this check and the open; callers open the resolved path, so
only a change to its own components in that window could matter.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRootError(ValueError):
    """A path that resolves outside its root; the message names the path, where it leads and the root."""

    def __init__(self, path: str, resolved: str, root: str):
        self.path, self.resolved, self.root = path, resolved, root
        lead = "" if resolved == path else f" resolves to {resolved},"
        super().__init__(f"{path}{lead} outside the root {root}")


def usable_path_text(path: str) -> bool:
    """Whether a string can name a file at all: no NUL byte, and encodable to the file system."""
    if "\x00" in path:
        return False
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def resolve_inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved; ``OutsideRootError`` unless inside ``root``.

    Raises ``ValueError`` for a path that cannot name a file (see ``usable_path_text``).
    """
    text, root_text = str(path), str(root)
    if not (usable_path_text(text) and usable_path_text(root_text)):
        raise ValueError(f"{text!r} cannot name a file (NUL byte or characters the file system cannot hold)")
    real_root = Path(os.path.realpath(root_text))
    resolved = Path(os.path.realpath(os.path.join(root_text, text)))
    if not resolved.is_relative_to(real_root):
        raise OutsideRootError(text, str(resolved), str(real_root))
    return resolved
