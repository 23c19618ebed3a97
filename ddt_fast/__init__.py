"""ddt_fast: a fast, faithful Decoupled Diffusion Transformer."""

from ddt_fast import (
    _extension,  # noqa: F401  (loads ddt_fast._C once)
    ops,
    schedule,
)
from ddt_fast._info import info
from ddt_fast._version import __version__
from ddt_fast.models import DDT, CheckpointError, create, load_checkpoint

__all__ = ["__version__", "info", "ops", "schedule", "DDT", "create", "load_checkpoint", "CheckpointError"]
