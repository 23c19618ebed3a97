"""Crash-safe file writes: write a temporary file in the target's folder,
flush it to disk, then rename it over the target. A crash never leaves a
half-written file in place of a good one."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: "os.PathLike[str] | str", write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the content, then rename it to `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: "os.PathLike[str] | str", text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
