"""Time grid, time shift, guidance interval and Adams-Bashforth weights,
as the published samplers define them (docs/spec.md, "Sampling")."""

from __future__ import annotations

from typing import List

import torch

__all__ = ["time_grid", "shift_time", "guided", "adams_weights"]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = t / (t + (1 - t) * shift); shift = 1 is the identity."""
    return t / (t + (1 - t) * shift)


def time_grid(num_steps: int, last_step: float, timeshift: float = 1.0) -> torch.Tensor:
    """`linspace(0, 1 - last_step, num_steps)` with 1.0 appended, then shifted:
    `num_steps + 1` float32 points on the CPU, time running from noise (0) to data (1)."""
    t = torch.linspace(0.0, 1.0 - last_step, num_steps)
    t = torch.cat([t, torch.tensor([1.0])])
    return shift_time(t, timeshift)


def guided(t: torch.Tensor, interval_min: float, interval_max: float) -> bool:
    """Whether classifier-free guidance applies at (shifted) time t: strictly inside the interval."""
    return bool(t > interval_min) and bool(t < interval_max)


def adams_weights(grid: torch.Tensor, order: int) -> List[List[torch.Tensor]]:
    """Per step i, the weights of the last `min(order, i + 1)` velocities (oldest
    first): the integrals over [t_i, t_{i+1}] of the Lagrange basis polynomials
    through those velocities' times, normalised to sum to one, so that the
    step is `x + sum_j w_j v_j * dt`. Computed with float32 scalars, like the grid."""
    if order not in (1, 2, 3):
        raise ValueError(f"Adams-Bashforth order must be 1, 2 or 3, got {order}")
    weights = []
    for i in range(len(grid) - 1):
        k = min(order, i + 1)
        ts = [grid[i - k + 1 + j] for j in range(k)]
        a, b = grid[i], grid[i + 1]
        integrals = [_lagrange_basis_integral(ts, j, a, b) for j in range(k)]
        total = sum(integrals[1:], integrals[0])
        weights.append([w / total for w in integrals])
    return weights


def _lagrange_basis_integral(ts, j, a, b):
    """Integral over [a, b] of prod_{m != j} (t - ts[m]) / (ts[j] - ts[m])."""
    others = [ts[m] for m in range(len(ts)) if m != j]
    if not others:
        return b - a
    denom = others[0].new_tensor(1.0)
    for o in others:
        denom = denom * (ts[j] - o)
    if len(others) == 1:  # (t - o): antiderivative t^2/2 - o t
        o = others[0]
        prim = lambda t: 0.5 * (t - o) ** 2
    else:  # (t - o1)(t - o2) = t^2 - (o1 + o2) t + o1 o2
        o1, o2 = others
        prim = lambda t: t**3 / 3 - 0.5 * (o1 + o2) * t**2 + o1 * o2 * t
    return (prim(b) - prim(a)) / denom
