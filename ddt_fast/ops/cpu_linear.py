"""Linear layers with 16-bit operands, computed in float32 (the CPU path of `ops.linear`).

Why: on CPUs without 16-bit matrix instructions (AVX2, AVX-512 without
BF16/FP16), PyTorch's bfloat16 and float16 matrix products run 5-7x slower
than float32 ones: on a 2-core Zen 3, `[1024, 1152] x [1152, 3072]` takes
371 ms in bfloat16 and 51 ms in float32. The product of two 16-bit numbers is
exact in float32, and PyTorch's 16-bit CPU kernels accumulate in float32 and
round once, so computing in float32 and rounding once gives the same numbers
up to the order of the sums (measured: 99.99% of bfloat16 outputs and 99.8%
of float16 outputs bit-equal, the rest one unit in the last place apart).

The backward saves the 16-bit operands, not float32 copies (half the memory
a plain `F.linear(x.float(), ...)` would keep), and widens them again when
it runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Float32Linear", "float32_linear"]

Tensor = torch.Tensor


class Float32Linear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` for 16-bit operands of one dtype, computed in
    float32 and returned in that dtype; gradients likewise."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        # (a backward called inside an autocast region would cast these float32
        # products back to 16 bits, onto the slow kernels)
        with torch.autocast("cpu", enabled=False):
            x, weight = ctx.saved_tensors
            g = grad.float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.float()).to(x.dtype)
            rows = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (rows.t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = rows.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


def float32_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """`F.linear` as it would run with every operand in `dtype` (their own
    dtype, or autocast's: the operands are cast first, as autocast does),
    computed in float32, returned in `dtype`."""
    with torch.autocast("cpu", enabled=False):
        return Float32Linear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
