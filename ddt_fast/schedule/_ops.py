"""Fake (meta) implementation of ddt_fast::dp_schedule_solve.

Imported by `import ddt_fast`, so the op can be traced (FakeTensor,
torch.compile) as soon as the package is loaded. The C++ library names this
module as the op's fake-implementation home, so torch's error message says
what to import if only ddt_fast._C was loaded.
"""
from __future__ import annotations

import torch

from ddt_fast import _extension


def _has_op() -> bool:
    return _extension.available() and hasattr(torch.ops.ddt_fast, "dp_schedule_solve")


if _has_op():

    @torch.library.register_fake("ddt_fast::dp_schedule_solve")
    def _dp_schedule_solve_fake(sim: torch.Tensor, k_max: int):
        torch._check(sim.dim() == 3, lambda: f"dp_schedule_solve: sim must be 3-D [B, N, N], got {sim.dim()}-D")
        torch._check(sim.shape[1] == sim.shape[2], lambda: f"dp_schedule_solve: sim must be square, got {tuple(sim.shape)}")
        torch._check(
            sim.dtype in (torch.float32, torch.float64),
            lambda: f"dp_schedule_solve: sim must be float32 or float64, got {sim.dtype}",
        )
        torch._check(1 <= k_max, lambda: f"dp_schedule_solve: k_max must be >= 1, got {k_max}")
        torch._check(k_max <= sim.shape[1], lambda: f"dp_schedule_solve: k_max must be <= N, got {k_max}")
        batch = sim.shape[0]
        cost = sim.new_empty((batch, k_max), dtype=torch.float64)
        steps = sim.new_empty((batch, k_max, k_max), dtype=torch.int32)
        return cost, steps
