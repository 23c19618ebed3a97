"""The named DDT architectures as plain data: each preset's constructor arguments.

Kept apart from `presets.py` (which builds models from them) so that
checkpoint reading, below the model class, can look up a published
architecture's encoder/decoder split without importing the model.
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["PRESETS", "match_preset"]

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


def match_preset(config: dict) -> Optional[str]:
    """The preset whose architecture (split aside) equals `config`, if any."""
    keys = ("in_channels", "num_groups", "hidden_size", "num_blocks", "patch_size", "num_classes")
    for name, preset in PRESETS.items():
        if all(preset[k] == config.get(k) for k in keys):
            return name
    return None
