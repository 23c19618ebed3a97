"""Fake (meta) implementation of ddt_fast::dp_schedule_solve.

Imported by `import ddt_fast`, so the op can be traced (FakeTensor,
torch.compile) as soon as the package is loaded. The C++ library names this
module as the op's fake-implementation home, so torch's error message says
what to import if only ddt_fast._C was loaded. Its checks are the kernel's
(ddt_fast/ops/_checks.py), but for the finite check, which needs the values.
"""

from __future__ import annotations

import torch

from ddt_fast import _extension
from ddt_fast.ops import _checks


def _has_op() -> bool:
    return _extension.available() and hasattr(torch.ops.ddt_fast, "dp_schedule_solve")


if _has_op():

    @torch.library.register_fake("ddt_fast::dp_schedule_solve")
    def _dp_schedule_solve_fake(sim: torch.Tensor, k_max: int):
        _checks.dp_schedule_solve(sim, k_max)
        batch = sim.shape[0]
        cost = sim.new_empty((batch, k_max), dtype=torch.float64)
        steps = sim.new_empty((batch, k_max, k_max), dtype=torch.int32)
        return cost, steps
