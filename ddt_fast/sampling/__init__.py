"""Samplers, encoder-sharing schedules and their calibration."""

from ddt_fast.sampling.calibration import Calibration, calibrate, calibration_settings, load_schedule, template_classes
from ddt_fast.sampling.grid import adams_weights, guided, shift_time, time_grid
from ddt_fast.sampling.outputs import decode_latents, load_vae, make_grid, plot_cost_curve, save_npz, save_png
from ddt_fast.sampling.runner import run_settings, sample_to_folder
from ddt_fast.sampling.samplers import (
    AdamLMSampler,
    AdamsSampler,
    EulerSampler,
    make_noise,
    resolve_schedule,
    sample,
    simple_guidance,
)
from ddt_fast.schedule import Schedule, every_step, from_steps, uniform

__all__ = [
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
