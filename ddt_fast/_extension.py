"""Loads the compiled extension ddt_fast._C once, if it was built.

Without it every op runs its pure-PyTorch reference; we say so once, in a
log line, and carry on.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from ddt_fast import _torch_private

logger = logging.getLogger("ddt_fast")

_C = None
_load_error: Optional[str] = None

try:  # registers torch.ops.ddt_fast.* as a side effect
    _C = importlib.import_module("ddt_fast._C")
except ImportError as e:  # not built, or built against another torch
    _load_error = f"{type(e).__name__}: {e}"
    logger.warning(
        "ddt_fast: compiled extension not available (%s); using the pure-PyTorch reference "
        "paths. Build it with `pip install --no-build-isolation .` or `make build`.",
        _load_error,
    )


def available() -> bool:
    return _C is not None


def load_error() -> Optional[str]:
    return _load_error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if torch.ops.ddt_fast.<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    if _C is None:
        return False

    name = f"ddt_fast::{op}"
    try:
        return _torch_private.dispatch_has_kernel(name, dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def registered_ops() -> list:
    """Names of the ddt_fast ops the extension registered (without the namespace)."""
    if _C is None:
        return []

    names = {name.split("::", 1)[1] for name in _torch_private.schema_names() if name.startswith("ddt_fast::")}
    return sorted(names - {"build_marker"})
