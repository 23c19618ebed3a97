"""Independent implementations of the statistic DP, for tests and benchmarks.

- :func:`solve_reference`: the recurrence in NumPy, vectorised over i and j
  per level. Same summation order and tie rule as the compiled solver, so it
  returns the same bits; it is the test oracle and the fallback when the
  extension is not built.
- :func:`solve_published_style`: one budget in pure Python loops, the way the
  published DDT sampler computes it. The benchmark baseline.
- :func:`brute_force`: every schedule, costed straight from the definition.

Conventions (docs/spec.md, "The statistic DP"):
``e[i][j] = 1 - sim[i][j]``; a run started at step ``j`` and reused through
step ``i`` costs ``E(j, i) = e[j][j] + e[j+1][j] + ... + e[i][j]``, summed in
that order; a schedule's cost is the sum of its runs' costs, first run first.
"""

from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

__all__ = ["solve_reference", "solve_published_style", "schedule_cost", "brute_force", "BruteForce"]


def _as_float64_array(sim) -> np.ndarray:
    if hasattr(sim, "detach"):  # a torch tensor, possibly on a GPU
        sim = sim.detach().cpu().numpy()
    return np.asarray(sim, dtype=np.float64)


def _run_costs(sim: np.ndarray) -> np.ndarray:
    """run[i, j] = E(j, i - 1) for 0 <= j < i <= n (other entries unused)."""
    n = sim.shape[0]
    # Entries above the diagonal are zeroed, so each column's running sum
    # adds exact zeros until row j and then e[j][j], e[j+1][j], ... in order.
    cum = np.cumsum(np.tril(1.0 - sim), axis=0)
    run = np.zeros((n + 1, n))
    run[1:] = cum
    return run


def _solve_one(sim: np.ndarray, k_max: int) -> Tuple[np.ndarray, np.ndarray]:
    n = sim.shape[0]
    run = _run_costs(sim)
    cost = np.empty(k_max)
    steps = np.full((k_max, k_max), -1, dtype=np.int32)
    arg = np.zeros((k_max + 1, n + 1), dtype=np.int64)  # arg[k][i]: start of the last run

    c_prev = np.full(n + 1, np.inf)
    c_prev[1:] = run[1:, 0]  # C[1][i] = E(0, i-1)
    cost[0] = c_prev[n]
    for k in range(2, k_max + 1):
        # Rows i = k..n, columns j = k-1..n-1; j < i is the lower triangle.
        cand = c_prev[k - 1 : n][None, :] + run[k:, k - 1 :]
        size = n - k + 1
        cand = np.where(np.tri(size, dtype=bool), cand, np.inf)
        first = np.argmin(cand, axis=1)  # the first minimum: ties to the smallest j
        c_cur = np.full(n + 1, np.inf)
        c_cur[k:] = cand[np.arange(size), first]
        arg[k, k:] = first + (k - 1)
        cost[k - 1] = c_cur[n]
        c_prev = c_cur

    for k in range(1, k_max + 1):
        i = n
        for m in range(k, 0, -1):
            j = 0 if m == 1 else int(arg[m, i])
            steps[k - 1, m - 1] = j
            i = j
    return cost, steps


def solve_reference(sim, k_max: int) -> Tuple[np.ndarray, np.ndarray]:
    """The DP in NumPy for every budget 1..k_max.

    ``sim``: ``[N, N]`` or ``[B, N, N]`` (array-like or tensor). Returns
    ``(cost, steps)``: float64 ``[k_max]`` and int32 ``[k_max, k_max]`` (a
    leading ``B`` for 3-D input); ``steps[k-1, :k]`` is the optimal ``k``-run
    schedule and the rest of the row is -1.
    """
    a = _as_float64_array(sim)
    if a.ndim not in (2, 3) or a.shape[-1] != a.shape[-2] or a.shape[-1] < 1:
        raise ValueError(f"sim must be [N, N] or [B, N, N] with N >= 1, got shape {a.shape}")
    n = a.shape[-1]
    if not 1 <= k_max <= n:
        raise ValueError(f"k_max must be in 1..N = 1..{n}, got {k_max}")
    if a.ndim == 2:
        return _solve_one(a, k_max)
    out = [_solve_one(m, k_max) for m in a]
    cost = np.stack([c for c, _ in out]) if out else np.empty((0, k_max))
    steps = np.stack([s for _, s in out]) if out else np.empty((0, k_max, k_max), dtype=np.int32)
    return cost, steps


def solve_published_style(sim, k: int) -> Tuple[float, List[int]]:
    """One budget ``k``, computed as the published DDT sampler does.

    Python lists and nested loops: the cumulative error table, then the DP
    table over (budget, step) with an inner loop over the last run's start,
    then the traceback. O(k N^2) interpreted steps. Returns
    ``(cost, steps)``.
    """
    rows = sim.tolist() if hasattr(sim, "tolist") else [list(r) for r in sim]
    n = len(rows)
    error = [[1.0 - v for v in row] for row in rows]
    for i in range(1, n):  # error[i][j] becomes E(j, i)
        for j in range(0, i):
            error[i][j] = error[i - 1][j] + error[i][j]

    cost = [[0.0] * (n + 1) for _ in range(k + 1)]
    prev = [[-1] * (n + 1) for _ in range(k + 1)]
    for i in range(1, n + 1):
        cost[1][i] = error[i - 1][0]
        prev[1][i] = 0
    for budget in range(2, k + 1):
        for i in range(budget, n + 1):
            best = math.inf
            best_j = -1
            for j in range(budget - 1, i):
                value = cost[budget - 1][j] + error[i - 1][j]
                if value < best:
                    best = value
                    best_j = j
            cost[budget][i] = best
            prev[budget][i] = best_j

    steps = []
    i = n
    for budget in range(k, 0, -1):
        i = prev[budget][i]
        steps.append(i)
    return cost[k][n], steps[::-1]


class BruteForce(NamedTuple):
    cost: float
    steps: List[int]
    num_optimal: int  # schedules within tie_tol of the best (1: the optimum is unique)


def schedule_cost(sim, steps: Sequence[int]) -> float:
    """Cost of a schedule from the definition, runs summed first to last."""
    e = _as_float64_array(sim)
    n = e.shape[0]
    total = 0.0
    bounds = list(steps) + [n]
    for start, end in zip(bounds[:-1], bounds[1:]):
        run = 0.0
        for step in range(start, end):
            run += 1.0 - float(e[step, start])
        total += run
    return total


def brute_force(sim, k: int, tie_tol: float = 1e-9) -> BruteForce:
    """The best ``k``-run schedule by enumerating all of them (small N only).

    Ties (equal float costs) go to the schedule whose last run starts
    earliest, then whose second-to-last run starts earliest, and so on. That
    is the rule the DP's "ties to the smallest j" produces in exact
    arithmetic; in floating point two schedules the DP would call tied may
    round apart, so compare steps only where ``num_optimal == 1`` or where
    the sums are exact (e.g. similarities that are multiples of 1/8).
    """
    a = _as_float64_array(sim)
    n = a.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N = 1..{n}, got {k}")
    scored = [(schedule_cost(a, (0,) + rest), (0,) + rest) for rest in itertools.combinations(range(1, n), k - 1)]
    best_cost, best_steps = min(scored, key=lambda cs: (cs[0], cs[1][::-1]))
    limit = best_cost + tie_tol * max(1.0, abs(best_cost))
    num_optimal = sum(1 for c, _ in scored if c <= limit)
    return BruteForce(best_cost, list(best_steps), num_optimal)
