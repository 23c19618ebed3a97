"""ddt_fast: a fast, faithful Decoupled Diffusion Transformer."""

from ddt_fast import (
    _extension,  # noqa: F401  (loads ddt_fast._C once)
    models,
    ops,
    schedule,
)
from ddt_fast._info import info
from ddt_fast._version import __version__
from ddt_fast.models import DDT, CheckpointError, create, load_checkpoint

__all__ = ["__version__", "info", "ops", "models", "schedule", "DDT", "create", "load_checkpoint", "CheckpointError"]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
