"""The private PyTorch APIs ddt_fast uses, in one place.

Everything here is an underscore name of torch (no stability promise across
releases); the rest of the package calls these wrappers instead, so a torch
upgrade that moves one of them is fixed here alone (tests/test_imports.py
checks that no other module touches `torch._*` or `torch.*._*`).
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Union

import torch
from torch.utils._pytree import tree_leaves, tree_map

__all__ = [
    "check",
    "dispatch_has_kernel",
    "foreach_add_",
    "foreach_mul_",
    "schema_names",
    "tree_leaves",
    "tree_map",
]


def dispatch_has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the operator `name` ("ns::op") has a kernel for `dispatch_key`
    ("CPU", "CUDA"). RuntimeError when no such operator is registered."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key))


def schema_names() -> List[str]:
    """The qualified names ("ns::op") of every registered operator schema."""
    return [schema.name for schema in torch._C._jit_get_all_schemas()]


def check(cond, message: Callable[[], str]) -> None:
    """`torch._check`: a RuntimeError with `message()` unless `cond`
    (symbolic sizes become a guard or a runtime assertion)."""
    torch._check(cond, message)


def foreach_mul_(tensors: Sequence[torch.Tensor], scalar: float) -> None:
    """`t *= scalar` for every tensor, in a few fused launches."""
    torch._foreach_mul_(tensors, scalar)


def foreach_add_(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor], alpha: Union[int, float] = 1) -> None:
    """`t += alpha * o` for every pair, in a few fused launches."""
    torch._foreach_add_(tensors, others, alpha=alpha)
