"""Config files the command line reads.

- ddt_fast's training config: a flat YAML (or JSON) mapping of `TrainConfig`
  fields (examples in `configs/`), plus `key=value` overrides from the
  command line (`steps=100`, `model_args.hidden_size=64`, `betas=[0.9,0.99]`;
  values are parsed as YAML).
- The published DDT code's Lightning CLI configs: `model.denoiser.init_args`
  (the architecture), `model.diffusion_sampler` (class and `init_args`: the
  sampler settings) and `data.latent_shape`, read by `sample` and `calibrate`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "ConfigError",
    "PUBLISHED_SAMPLERS",
    "PUBLISHED_SAMPLER_ARGS",
    "PUBLISHED_SAMPLER_IGNORED",
    "read_config",
    "parse_value",
    "apply_overrides",
    "is_published_config",
    "load_train_config",
    "published_settings",
]

# published sampler arguments -> ddt-fast sample/calibrate options
PUBLISHED_SAMPLER_ARGS = {
    "num_steps": "steps",
    "guidance": "guidance",
    "timeshift": "shift",
    "guidance_interval_min": "interval_min",
    "guidance_interval_max": "interval_max",
    "last_step": "last_step",
    "state_refresh_rate": "refresh_rate",
    "order": "order",
}
# published sampler arguments that name functions / classes of the published code; DDT's sampler is
# the linear flow with the ODE step and CFG, which these select there
PUBLISHED_SAMPLER_IGNORED = ("scheduler", "w_scheduler", "step_fn", "last_step_fn", "guidance_fn")
PUBLISHED_SAMPLERS = {"EulerSampler": "euler", "AdamLMSampler": "adams", "AdamsSampler": "adams"}


class ConfigError(ValueError):
    """A config file is missing, unreadable, or holds a setting that does not exist."""


_LOADER = None


def _yaml_loader(what: str):
    """PyYAML's safe loader, also reading `1e-4` as a float (YAML 1.1 alone needs `1.0e-4`)."""
    global _LOADER
    try:
        import yaml
    except ImportError as e:
        raise ImportError(
            f"{what} needs PyYAML: pip install pyyaml (or pip install 'ddt_fast[cli]'), "
            "or pass the same settings as a .json file"
        ) from e
    if _LOADER is None:
        import re

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(
                r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
            ),
            list("-+0123456789."),
        )
        _LOADER = Loader
    return yaml, _LOADER


def read_config(path: str) -> Dict[str, Any]:
    """A YAML or JSON file as a dict (YAML needs PyYAML)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    else:
        yaml, loader = _yaml_loader(f"reading the YAML config {path}")
        try:
            data = yaml.load(text, Loader=loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, expected a mapping of settings")
    return data


def parse_value(text: str) -> Any:
    """A command-line override's value: YAML scalars / lists / mappings (`100`, `1e-3`, `true`, `null`,
    `[0.9, 0.99]`, `{in_channels: 1}`), else the string itself."""
    try:
        yaml, loader = _yaml_loader("parsing overrides")
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError:  # keep the text as a string
        return text


def apply_overrides(config: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """`key=value` (dotted keys reach into mappings: `model_args.hidden_size=64`)."""
    config = json.loads(json.dumps(config))  # a deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. steps=100 or model_args.hidden_size=64)")
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} holds {child!r}, not a mapping")
            node = child
        node[parts[-1]] = parse_value(value)
    return config


def is_published_config(config: Mapping[str, Any]) -> bool:
    model = config.get("model")
    return isinstance(model, Mapping) and any(k in model for k in ("denoiser", "diffusion_sampler"))


def load_train_config(path: str, overrides: List[str] = ()):
    """A `TrainConfig` from a flat YAML/JSON file of its fields plus `key=value` overrides."""
    from ddt_fast.training import TrainConfig

    data = read_config(path)
    if is_published_config(data):
        raise ConfigError(
            f"{path} is a config of the published Lightning code (model.denoiser / "
            "model.diffusion_sampler); `ddt-fast train` takes ddt_fast's flat training config "
            "(see configs/ddt_xl2_256.yaml, which mirrors the published recipe). "
            "`sample` and `calibrate` read published configs."
        )
    data = apply_overrides(data, list(overrides))
    try:
        return TrainConfig.from_dict(data)
    except TypeError as e:  # a value of the wrong shape, e.g. a list where a mapping goes
        raise ConfigError(f"{path}: {e}") from e


def _init_args(section: Any, where: str) -> Dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a mapping with class_path and init_args, got {section!r}")
    args = section.get("init_args", {}) or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}.init_args must be a mapping, got {args!r}")
    return dict(args)


def published_settings(config: Mapping[str, Any], path: str = "config") -> Dict[str, Any]:
    """What `sample` / `calibrate` take from a published Lightning config:
    `{"model": DDT constructor args, "sampler": "euler" | "adams",
    "options": {option: value}, "latent_size": int | None}`. Unknown
    denoiser or sampler arguments raise ConfigError naming them."""
    from ddt_fast.models.presets import constructor_args

    if not is_published_config(config):
        raise ConfigError(
            f"{path} has no model.denoiser or model.diffusion_sampler section: it is not a config "
            "of the published DDT code (expected model: {denoiser: {init_args: ...}, "
            "diffusion_sampler: {class_path: ..., init_args: ...}})"
        )
    model = config["model"]
    denoiser = _init_args(model.get("denoiser"), "model.denoiser")
    valid = set(constructor_args())
    unknown = sorted(set(denoiser) - valid)
    if unknown:
        raise ConfigError(
            f"{path}: model.denoiser.init_args has unknown setting(s) {unknown}; "
            f"the DDT constructor takes {sorted(valid)}"
        )
    sampler_section = model.get("diffusion_sampler") or {}
    class_name = str(sampler_section.get("class_path", "EulerSampler")).rsplit(".", 1)[-1]
    if class_name not in PUBLISHED_SAMPLERS:
        raise ConfigError(
            f"{path}: model.diffusion_sampler.class_path {class_name!r} is not a sampler ddt_fast "
            f"runs; known: {sorted(PUBLISHED_SAMPLERS)}"
        )
    sampler_args = _init_args(sampler_section, "model.diffusion_sampler")
    unknown = sorted(set(sampler_args) - set(PUBLISHED_SAMPLER_ARGS) - set(PUBLISHED_SAMPLER_IGNORED))
    if unknown:
        raise ConfigError(
            f"{path}: model.diffusion_sampler.init_args has unknown setting(s) {unknown}; "
            f"known: {sorted(PUBLISHED_SAMPLER_ARGS)} (and {list(PUBLISHED_SAMPLER_IGNORED)}, "
            "which select DDT's defaults)"
        )
    options = {PUBLISHED_SAMPLER_ARGS[k]: v for k, v in sampler_args.items() if k in PUBLISHED_SAMPLER_ARGS}
    latent_size: Optional[int] = None
    shape = (config.get("data") or {}).get("latent_shape") if isinstance(config.get("data"), Mapping) else None
    if shape is not None:
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and shape[1] == shape[2]):
            raise ConfigError(f"{path}: data.latent_shape must be [C, H, H], got {shape!r}")
        latent_size = int(shape[1])
    return {
        "model": denoiser,
        "sampler": PUBLISHED_SAMPLERS[class_name],
        "options": options,
        "latent_size": latent_size,
    }
