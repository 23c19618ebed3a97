"""Encoder-sharing schedules and the statistic DP that chooses them.

from ddt_fast.schedule import solve
result = solve(sim, k_max=50)           # sim: [N, N] or [B, N, N]
result.curve()                          # [(budget, cost), ...] for 1..k_max
sched = result.schedule(result.smallest_budget(tol=0.5))
sched.recompute(i)                      # does step i run the encoder?

Calibration.load(path).schedule(k)      # a saved calibration's DP schedule
load_schedule(path, budget=50)          # from a schedule or calibration file
"""

from ddt_fast.schedule.calibration import Calibration, load_schedule
from ddt_fast.schedule.schedule import Schedule, every_step, from_steps, uniform
from ddt_fast.schedule.solver import DPResult, solve

__all__ = ["solve", "DPResult", "Schedule", "uniform", "every_step", "from_steps", "Calibration", "load_schedule"]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
