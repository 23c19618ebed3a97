"""Samplers, encoder-sharing schedules and their calibration.

`Schedule`, `Calibration` and `load_schedule` belong to `ddt_fast.schedule`
and are re-exported here.
"""

from ddt_fast.sampling.calibration import calibrate, calibration_settings, template_classes
from ddt_fast.sampling.grid import adams_weights, guided, shift_time, time_grid
from ddt_fast.sampling.outputs import decode_latents, load_vae, make_grid, plot_cost_curve, save_npz, save_png
from ddt_fast.sampling.runner import run_settings, sample_to_folder
from ddt_fast.sampling.samplers import (
    AdamLMSampler,
    AdamsSampler,
    EulerSampler,
    Sampler,
    make_noise,
    resolve_schedule,
    sample,
    simple_guidance,
)
from ddt_fast.schedule import Calibration, Schedule, every_step, from_steps, load_schedule, uniform

__all__ = [
    "Sampler",
    "EulerSampler",
    "AdamsSampler",
    "AdamLMSampler",
    "sample",
    "make_noise",
    "simple_guidance",
    "calibrate",
    "Calibration",
    "calibration_settings",
    "template_classes",
    "run_settings",
    "load_schedule",
    "resolve_schedule",
    "time_grid",
    "shift_time",
    "guided",
    "adams_weights",
    "Schedule",
    "every_step",
    "uniform",
    "from_steps",
    "load_vae",
    "decode_latents",
    "make_grid",
    "plot_cost_curve",
    "save_npz",
    "save_png",
    "sample_to_folder",
]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
