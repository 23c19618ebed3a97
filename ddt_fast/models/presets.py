"""Named DDT architectures: the published ones and tiny ones for tests and demos.

`create("DDT-XL/2", num_encoder_blocks=22)` builds a model; any constructor
argument can be overridden. The encoder/decoder split is a parameter because
the paper trained several (B with 4/6/8/10 encoder blocks, L with
10/12/16/20); the defaults are the published choices. The table itself
(`PRESETS`) is plain data in `_architectures.py`.
"""

from __future__ import annotations

import inspect
from typing import List

from ddt_fast.models._architectures import PRESETS, match_preset
from ddt_fast.models.ddt import DDT

__all__ = ["PRESETS", "preset_names", "preset_config", "create", "match_preset", "constructor_args"]


def preset_names() -> list:
    return list(PRESETS)


def constructor_args() -> List[str]:
    """The names of the `DDT` constructor's arguments."""
    return [p for p in inspect.signature(DDT.__init__).parameters if p != "self"]


def preset_config(name: str, **overrides) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown DDT preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[name])
    unknown = set(overrides) - set(constructor_args())
    if unknown:
        raise TypeError(f"unknown DDT argument(s) {sorted(unknown)}; valid: {sorted(constructor_args())}")
    config.update(overrides)
    return config


def create(name: str, **overrides) -> DDT:
    """Build the preset `name` (e.g. "DDT-XL/2"), overriding any constructor argument."""
    return DDT(**preset_config(name, **overrides))
