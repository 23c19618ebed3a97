"""solve(): the statistic DP for every budget, for one or many similarity matrices."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import List, Tuple

import numpy as np
import torch

from ddt_fast import _extension
from ddt_fast.ops import auto_uses_fused, get_backend, has_fused_kernel
from ddt_fast.schedule import _ops  # noqa: F401  (registers the op's fake implementation)
from ddt_fast.schedule.reference import solve_reference
from ddt_fast.schedule.schedule import Schedule, _as_int

__all__ = ["solve", "DPResult"]

_OP = "dp_schedule_solve"
_BACKENDS = ("auto", "fused", "reference")


@dataclass(frozen=True, repr=False)
class DPResult:
    """Optimal schedules and costs for every budget ``1..k_max``.

    ``cost``: float64, ``[k_max]`` (``[B, k_max]`` for a batch); ``cost[k-1]``
    is the least total error with ``k`` encoder runs. ``steps_table``: int32,
    ``[k_max, k_max]`` (``[B, k_max, k_max]``); row ``k-1`` holds the ``k``
    steps, then -1. Both live on the device of the input.
    """

    cost: torch.Tensor
    steps_table: torch.Tensor
    num_steps: int
    k_max: int
    batched: bool

    @property
    def batch_size(self) -> int:
        return self.cost.shape[0] if self.batched else 1

    @cached_property
    def _cost_host(self) -> np.ndarray:
        return self.cost.detach().cpu().numpy().reshape(self.batch_size, self.k_max)

    @cached_property
    def _steps_host(self) -> np.ndarray:
        return self.steps_table.detach().cpu().numpy().reshape(self.batch_size, self.k_max, self.k_max)

    def _check(self, k: int, problem: int) -> Tuple[int, int]:
        problem = _as_int(problem, "problem")
        if not 0 <= problem < self.batch_size:
            if self.batched:
                raise IndexError(f"problem {problem} is out of range for a batch of {self.batch_size}")
            raise IndexError(f"problem must be 0 for an unbatched result, got {problem}")
        k = _as_int(k, "budget k")
        if not 1 <= k <= self.k_max:
            raise IndexError(
                f"budget k={k} is out of range: this result holds budgets 1..{self.k_max} "
                f"(solve with a larger k_max, at most N={self.num_steps}, for more)"
            )
        return k, problem

    def steps(self, k: int, problem: int = 0) -> List[int]:
        """The optimal recompute steps with ``k`` encoder runs."""
        k, problem = self._check(k, problem)
        return [int(s) for s in self._steps_host[problem, k - 1, :k]]

    def schedule(self, k: int, problem: int = 0) -> Schedule:
        k, problem = self._check(k, problem)
        meta = {"k_max": self.k_max}
        if self.batched:
            meta["problem"] = problem
        return Schedule(
            tuple(self.steps(k, problem)),
            self.num_steps,
            kind="dp",
            cost=float(self._cost_host[problem, k - 1]),
            meta=meta,
        )

    def curve(self, problem: int = 0) -> List[Tuple[int, float]]:
        """(budget, optimal cost) for every budget 1..k_max."""
        _, problem = self._check(1, problem)
        return [(k, float(c)) for k, c in enumerate(self._cost_host[problem], start=1)]

    def smallest_budget(self, tol: float, problem: int = 0) -> int:
        """The smallest budget k whose optimal cost is <= tol."""
        _, problem = self._check(1, problem)
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
            raise TypeError(f"tol must be a number, got {type(tol).__name__}")
        if math.isnan(tol):
            raise ValueError("tol must not be NaN")
        costs = self._cost_host[problem]
        within = np.nonzero(costs <= tol)[0]
        if within.size == 0:
            raise ValueError(
                f"no budget up to k_max={self.k_max} reaches cost <= {tol} (the cost at k={self.k_max} "
                f"is {costs[-1]:.6g}); solve with a larger k_max (at most N={self.num_steps}) or raise tol"
            )
        return int(within[0]) + 1

    def __repr__(self) -> str:
        batch = f", batch={self.batch_size}" if self.batched else ""
        return f"DPResult(num_steps={self.num_steps}, k_max={self.k_max}{batch}, device={self.cost.device})"


def _as_tensor(sim) -> torch.Tensor:
    if isinstance(sim, torch.Tensor):
        return sim.detach()
    if isinstance(sim, np.ndarray):
        if sim.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"sim must be float32 or float64, got numpy {sim.dtype}; convert it with sim.astype(np.float64)"
            )
        if any(s < 0 for s in sim.strides):
            sim = np.ascontiguousarray(sim)
        return torch.from_numpy(sim)
    raise TypeError(f"sim must be a torch.Tensor or numpy.ndarray, got {type(sim).__name__}")


def _check_finite(sim: torch.Tensor, batched: bool) -> None:
    # NumPy on the CPU: one pass, one thread, a few microseconds for N = 250,
    # and unaffected by the state of torch's thread pool.
    finite = bool(np.isfinite(sim.numpy()).all()) if sim.device.type == "cpu" else bool(torch.isfinite(sim).all())
    if finite:
        return
    b, i, j = (int(x) for x in (~torch.isfinite(sim)).nonzero()[0])
    value = float(sim[b, i, j])
    where = f"sim[{b}] (problem {b}) has" if batched else "sim has"
    raise ValueError(
        f"{where} a non-finite similarity {value} at [{i}, {j}]; the DP needs finite values: "
        "recompute that matrix, or repair it (e.g. torch.nan_to_num) before solving"
    )


def _backend(backend) -> str:
    if backend is None:
        return get_backend()
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def solve(sim, k_max: int, *, backend: str | None = None) -> DPResult:
    """Optimal encoder-sharing schedules for every budget ``1..k_max``.

    ``sim``: similarity matrix ``[N, N]`` or a batch ``[B, N, N]``, float32 or
    float64 (solved in float64), a torch tensor (CPU or CUDA) or a NumPy array.
    ``backend``: 'auto' (the compiled kernel for the input's device when the
    extension has one -- on CUDA only once GPU-verified, else the CPU kernel
    with the results moved back -- and the NumPy reference without the
    extension), 'fused' (the kernel for the input's device, or an error) or
    'reference'; defaults to the ops backend (``$DDT_FAST_BACKEND``, 'auto').
    """
    t = _as_tensor(sim)
    if t.dim() not in (2, 3):
        raise ValueError(f"sim must be [N, N] or [B, N, N], got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"sim must be square in its last two dimensions, got shape {tuple(t.shape)}")
    n = t.shape[-1]
    if n < 1:
        raise ValueError("sim needs at least one step (N >= 1), got N = 0")
    k_max = _as_int(k_max, "k_max")
    if not 1 <= k_max <= n:
        raise ValueError(f"k_max must be in 1..N = 1..{n}, got {k_max}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sim must be float32 or float64, got {t.dtype}; convert it with sim.double()")
    batched = t.dim() == 3
    t3 = t if batched else t.unsqueeze(0)
    _check_finite(t3, batched)

    mode = _backend(backend)
    device = t3.device
    has_kernel = has_fused_kernel(_OP, device)
    if mode == "fused" and not has_kernel:
        raise RuntimeError(
            f"no compiled {_OP} kernel for {device.type} tensors "
            f"(extension loaded: {_extension.available()}); build ddt_fast._C or use backend='reference'"
        )
    op = torch.ops.ddt_fast.dp_schedule_solve if _extension.available() else None
    if mode == "fused" or (mode == "auto" and auto_uses_fused(_OP, device)):
        cost, steps = op(t3, k_max)
    elif mode == "auto" and has_fused_kernel(_OP, "cpu"):
        # A CUDA kernel not yet GPU-verified (ops/verified.py): solve on the CPU.
        cost, steps = (x.to(device) for x in op(t3.cpu(), k_max))
    else:
        c, s = solve_reference(t3.cpu().double().numpy(), k_max)
        cost = torch.from_numpy(c).to(device)
        steps = torch.from_numpy(s).to(device)

    if not batched:
        cost, steps = cost[0], steps[0]
    return DPResult(cost=cost, steps_table=steps, num_steps=n, k_max=k_max, batched=batched)
