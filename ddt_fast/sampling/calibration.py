"""Calibration of encoder-sharing schedules (the paper's statistic DP).

Run the template sampling (a few random classes, fixed seed, the sampler's
settings) with the encoder at every step, and accumulate
`sim[i][j]` = mean over token positions (both CFG halves, all samples) of the
dot product of the unit-normalised self-conditions of steps i and j, in
float64, as each step finishes. The DP then gives the optimal schedule and
its cost for every budget.

Memory: every step's normalised states are kept once, in `state_dtype`
(bf16 by default), on the sampling device or, with `states_on_cpu=True`, in
CPU memory: `num_steps * 2 * num_samples * L * C * 2` bytes in bf16 (DDT-XL at
256 px, 250 steps, 8 samples: 250 * 16 * 256 * 1152 * 2 B = 2.4 GB), plus one
`[N, N]` float64 matrix.

What a calibration keeps and how files are read back (`Calibration`,
`load_schedule`) belong to `ddt_fast.schedule`; they are re-exported here.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import numpy as np
import torch

from ddt_fast.models import weights_digest
from ddt_fast.sampling.samplers import Sampler, make_noise
from ddt_fast.schedule import Calibration, every_step, load_schedule

__all__ = ["calibrate", "calibration_settings", "template_classes", "Calibration", "load_schedule"]


def calibrate(
    model,
    sampler: Sampler,
    num_samples: int = 8,
    seed: int = 0,
    classes: Optional[List[int]] = None,
    latent_size: int = 32,
    state_dtype: torch.dtype = torch.bfloat16,
    states_on_cpu: bool = False,
    device=None,
) -> Calibration:
    """Run the template sampling with the encoder at every step and return the
    similarity statistic with its DP solution (see the module docstring).

    `sampler` supplies the settings (steps, guidance, interval, shift); it
    runs in reference mode with an every-step schedule. `classes` default to
    `num_samples` random classes drawn from `seed`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = device if device is not None else next(model.parameters()).device
    if classes is None:
        classes = template_classes(model.num_classes, num_samples, seed)
    labels = torch.as_tensor(classes, dtype=torch.long, device=device)
    noise = make_noise(
        [seed * 1_000_003 + k for k in range(len(labels))], (model.in_channels, latent_size, latent_size), device
    )
    template = copy.copy(sampler)  # same settings, run as the published sampler with no sharing
    template.mode = "reference"
    template.schedule = every_step(sampler.num_steps)
    N = sampler.num_steps
    sim = np.zeros((N, N), dtype=np.float64)
    states: List[torch.Tensor] = []

    def on_step(i, s):
        unit = torch.nn.functional.normalize(s.double(), dim=-1)
        stored = unit.to(state_dtype)
        if states_on_cpu:
            stored = stored.cpu()
        states.append(stored)
        for j in range(i + 1):  # row i, as soon as step i is done
            other = unit if j == i else states[j].to(unit.device, torch.float64)
            sim[i, j] = sim[j, i] = float((unit * other).sum(-1).mean())

    settings = calibration_settings(
        model, sampler, seed=seed, classes=list(map(int, labels)), latent_size=latent_size, state_dtype=state_dtype
    )
    template(model, noise, labels, torch.full_like(labels, model.num_classes), on_step=on_step)
    return Calibration(sim, settings)


def template_classes(num_classes: int, num_samples: int, seed: int) -> List[int]:
    """The classes a calibration draws when none are given."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_samples,), generator=g).tolist()


def calibration_settings(
    model,
    sampler: Sampler,
    num_samples: int = 8,
    seed: int = 0,
    classes: Optional[List[int]] = None,
    latent_size: int = 32,
    state_dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """What `calibrate` with these arguments depends on: the sampler's settings,
    the template batch (classes, seed, latent size) and the model's weights
    (`weights_sha256`). `Calibration.settings` holds it; compare it with
    `Calibration.differences` before reusing a saved calibration."""
    if classes is None:
        classes = template_classes(model.num_classes, num_samples, seed)
    return dict(
        sampler.settings(),
        num_samples=len(classes),
        seed=int(seed),
        classes=[int(c) for c in classes],
        latent_size=int(latent_size),
        state_dtype=str(state_dtype).replace("torch.", ""),
        weights_sha256=weights_digest(model),
        model_config=dict(model.config),
    )
