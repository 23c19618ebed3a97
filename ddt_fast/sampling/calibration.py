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
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from ddt_fast._io import atomic_write_text
from ddt_fast.models import weights_digest
from ddt_fast.sampling.samplers import _Sampler, make_noise
from ddt_fast.schedule import DPResult, Schedule, every_step, solve

_FORMAT = "ddt_fast.calibration"


@dataclass
class Calibration:
    """The similarity statistic of one template sampling and its DP solution."""

    similarity: np.ndarray  # [N, N] float64
    settings: dict = field(default_factory=dict)
    dp: Optional[DPResult] = None

    def __post_init__(self):
        if self.dp is None:
            self.dp = solve(torch.from_numpy(np.ascontiguousarray(self.similarity)), self.num_steps)

    @property
    def num_steps(self) -> int:
        return int(self.similarity.shape[0])

    def curve(self):
        """[(budget, cost)] for every budget 1..N."""
        return self.dp.curve()

    def schedule(self, budget: int) -> Schedule:
        sched = self.dp.schedule(budget)
        return Schedule(sched.steps, sched.num_steps, "dp", sched.cost, dict(sched.meta, **self._meta()))

    def schedule_for_ratio(self, ratio: float) -> Schedule:
        """The DP schedule at a sharing ratio (fraction of steps that reuse s): K = round(N * (1 - ratio))."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"sharing ratio must be in [0, 1), got {ratio}")
        return self.schedule(max(1, round(self.num_steps * (1.0 - ratio))))

    def schedule_for_tolerance(self, tol: float) -> Schedule:
        """The DP schedule of the smallest budget whose cost is at most `tol`."""
        return self.schedule(self.dp.smallest_budget(tol))

    def differences(self, settings: dict) -> dict:
        """`{key: (recorded, given)}` for every setting that differs from `settings`
        (empty: this calibration is the one those settings would compute)."""
        keys = set(self.settings) | set(settings)
        return {
            k: (self.settings.get(k), settings.get(k)) for k in sorted(keys) if self.settings.get(k) != settings.get(k)
        }

    def _meta(self) -> dict:
        return {"calibration": {k: self.settings[k] for k in sorted(self.settings)}}

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
            "settings": self.settings,
            "similarity": self.similarity.tolist(),
            "cost": [c for _, c in self.curve()],
        }

    def save(self, path, overwrite: bool = False) -> None:
        """JSON (settings, similarity, cost curve), written to a temporary file and
        renamed; an existing `path` is replaced only with `overwrite=True`."""
        atomic_write_text(path, json.dumps(self.to_dict()), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "Calibration":
        d = _read_json(path)
        if d.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a calibration file (format {d.get('format')!r})")
        sim = np.asarray(d["similarity"], dtype=np.float64)
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"{path}: similarity must be a square matrix, got shape {sim.shape}")
        return cls(sim, d.get("settings", {}))


def _read_json(path) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"schedule file not found: {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is it a schedule or calibration file?") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not a schedule or calibration object")
    return d


def load_schedule(
    path, budget: Optional[int] = None, ratio: Optional[float] = None, tol: Optional[float] = None
) -> Schedule:
    """A Schedule from a schedule file, or from a calibration file with one of
    `budget`, `ratio` (sharing ratio) or `tol` (default: ratio 0.8, the paper's
    setting)."""
    d = _read_json(path)
    if d.get("format") == _FORMAT:
        cal = Calibration.load(path)
        if budget is not None:
            return cal.schedule(budget)
        if tol is not None:
            return cal.schedule_for_tolerance(tol)
        return cal.schedule_for_ratio(0.8 if ratio is None else ratio)
    try:
        return Schedule.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is neither a schedule nor a calibration file: {e}") from e


def calibrate(
    model,
    sampler: _Sampler,
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
    sampler: _Sampler,
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
