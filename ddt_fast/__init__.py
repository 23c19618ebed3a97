"""ddt_fast: a fast, faithful Decoupled Diffusion Transformer."""
from ddt_fast._version import __version__
from ddt_fast import _extension
from ddt_fast._info import info
from ddt_fast import schedule

__all__ = ["__version__", "info", "schedule"]
