"""Named DDT architectures: the published ones and tiny ones for tests and demos.

`create("DDT-XL/2", num_encoder_blocks=22)` builds a model; any constructor
argument can be overridden. The encoder/decoder split is a parameter because
the paper trained several (B with 4/6/8/10 encoder blocks, L with
10/12/16/20); the defaults are the published choices.
"""

from __future__ import annotations

from typing import Dict, Optional

from ddt_fast.models.ddt import DDT

_IMAGENET = dict(in_channels=4, patch_size=2, num_classes=1000)

PRESETS: Dict[str, dict] = {
    "DDT-B/2": dict(hidden_size=768, num_groups=12, num_blocks=12, num_encoder_blocks=8, **_IMAGENET),
    "DDT-L/2": dict(hidden_size=1024, num_groups=16, num_blocks=24, num_encoder_blocks=20, **_IMAGENET),
    "DDT-XL/2": dict(hidden_size=1152, num_groups=16, num_blocks=28, num_encoder_blocks=22, **_IMAGENET),
    # Small models for tests and CPU demos (head dims 16 and 72, the latter as in XL).
    "DDT-tiny/2": dict(
        hidden_size=64, num_groups=4, num_blocks=4, num_encoder_blocks=2, in_channels=4, patch_size=2, num_classes=10
    ),
    "DDT-tiny-d72/2": dict(
        hidden_size=144, num_groups=2, num_blocks=3, num_encoder_blocks=2, in_channels=4, patch_size=2, num_classes=10
    ),
}


def preset_names() -> list:
    return list(PRESETS)


def preset_config(name: str, **overrides) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown DDT preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[name])
    unknown = set(overrides) - set(_constructor_args())
    if unknown:
        raise TypeError(f"unknown DDT argument(s) {sorted(unknown)}; valid: {sorted(_constructor_args())}")
    config.update(overrides)
    return config


def create(name: str, **overrides) -> DDT:
    """Build the preset `name` (e.g. "DDT-XL/2"), overriding any constructor argument."""
    return DDT(**preset_config(name, **overrides))


def match_preset(config: dict) -> Optional[str]:
    """The preset whose architecture (split aside) equals `config`, if any."""
    keys = ("in_channels", "num_groups", "hidden_size", "num_blocks", "patch_size", "num_classes")
    for name, preset in PRESETS.items():
        if all(preset[k] == config.get(k) for k in keys):
            return name
    return None


def _constructor_args():
    import inspect

    return [p for p in inspect.signature(DDT.__init__).parameters if p != "self"]
