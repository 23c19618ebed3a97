"""Calibration files: the similarity statistic of a template sampling with
its DP solution (`Calibration`), and `load_schedule`, which reads a schedule
file or a calibration file.

The statistic is computed by `ddt_fast.sampling.calibrate` (it runs the
sampler); this module holds what is saved and what is read back, so that
the schedule layer owns every file format of schedules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ddt_fast._io import atomic_write_text
from ddt_fast.schedule.schedule import Schedule
from ddt_fast.schedule.solver import DPResult, solve

__all__ = ["Calibration", "load_schedule"]

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
