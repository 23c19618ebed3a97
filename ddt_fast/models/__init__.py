"""DDT models: the model class, named presets."""
from ddt_fast.models.ddt import DDT, DDTBlock
from ddt_fast.models.presets import PRESETS, create, match_preset, preset_config, preset_names

__all__ = ["DDT", "DDTBlock", "PRESETS", "create", "match_preset", "preset_config", "preset_names"]
