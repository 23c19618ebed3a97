"""The op surface the DDT model calls: one function per (future) fused op.

Every function picks its implementation through `dispatch` (fused kernel or
the pure-PyTorch reference in `reference.py`); the model never branches on
devices or backends itself. Arguments neither path can compute meaningfully
are refused first, whichever path would run: tensors that are not
floating-point (integer, bool, complex), a non-finite or negative eps, a
num_heads that does not split the width.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ddt_fast.ops import dispatch, fused, reference  # noqa: F401  (fused: registrations)
from ddt_fast.ops.cpu_linear import float32_linear
from ddt_fast.ops.dispatch import (
    auto_uses_fused,
    get_attention_backend,
    get_backend,
    get_cpu_linear,
    has_fused_kernel,
    set_attention_backend,
    set_backend,
    set_cpu_linear,
    use_backend,
)

Tensor = torch.Tensor

# Ops the model calls. A fused kernel registers as torch.ops.ddt_fast.<name>
# with the same argument order as the function here.
MODEL_OPS = (
    "rms_norm_modulate",
    "layer_norm_modulate",
    "gated_residual",
    "gated_residual_rms_norm_modulate",
    "qk_norm_rope",
    "swiglu",
    "attention",
)

# Names of the compiled kernels that can be GPU-verified (ops/verified.py): the
# model ops' kernels, with attention as the flash kernel and its fused
# q/k norm + rotary prologue variant, and the DP schedule solver.
KERNEL_OPS = tuple(op for op in MODEL_OPS if op != "attention") + (
    "flash_attention",
    "qkv_attention",
    "dp_schedule_solve",
)


def _fused(name: str):
    return getattr(torch.ops.ddt_fast, name)


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _kernel_takes(x: Tensor, params=(), mods=()) -> bool:
    """Whether the fused kernels accept these dtypes/devices: x in a supported
    dtype; weights and modulation each x's dtype or (for 16-bit x) float32,
    the modulation tensors sharing one dtype. Anything else takes the
    reference path, which follows PyTorch's type promotion."""
    if x.dtype not in _KERNEL_DTYPES:
        return False
    ok = (x.dtype,) + ((torch.float32,) if x.dtype in (torch.float16, torch.bfloat16) else ())
    if any(t.dtype not in ok or t.device != x.device for t in (*params, *mods)):
        return False
    return len({t.dtype for t in mods}) <= 1


_FLOATING = "floating-point tensors (float32, float64, float16 and bfloat16 run the fused kernels)"


def _check_floating(op: str, names: Tuple[str, ...], *tensors) -> None:
    """Each of `tensors` (argument `names`) a floating-point tensor: the
    reference would compute integer or bool inputs in another dtype, or
    silently truncate, rather than fail."""
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ddt_fast.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"ddt_fast.ops.{op}: {name} has dtype {t.dtype}; supported: {_FLOATING}")


def _check_eps(op: str, eps) -> None:
    if not 0 <= eps < math.inf:  # NaN fails both
        raise ValueError(f"ddt_fast.ops.{op}: eps must be a finite number >= 0, got {eps} (the model uses 1e-6)")


def _check_qkv(
    op: str, qkv: Tensor, q_weight: Tensor, k_weight: Tensor, num_heads: int, freqs_cis: Tensor, eps
) -> None:
    _check_floating(op, ("qkv", "q_weight", "k_weight"), qkv, q_weight, k_weight)
    if not (isinstance(freqs_cis, torch.Tensor) and freqs_cis.is_complex()):
        got = freqs_cis.dtype if isinstance(freqs_cis, torch.Tensor) else type(freqs_cis).__name__
        raise TypeError(
            f"ddt_fast.ops.{op}: freqs_cis must be a complex tensor [L, head_dim / 2] (rope_frequencies), got {got}"
        )
    _check_eps(op, eps)
    if qkv.dim() != 3:
        raise ValueError(f"ddt_fast.ops.{op}: qkv must be [B, L, 3C], got {list(qkv.shape)}")
    width = qkv.shape[-1]
    if not num_heads > 0:
        raise ValueError(f"ddt_fast.ops.{op}: num_heads must be > 0, got {num_heads!r}")
    if width % (3 * num_heads):
        raise ValueError(
            f"ddt_fast.ops.{op}: qkv's last dim {width} is not 3 * num_heads ({num_heads}) * "
            f"head_dim; num_heads must divide C = {width // 3} and qkv be [B, L, 3C]"
        )


def rms_norm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    _check_floating("rms_norm_modulate", ("x", "weight", "shift", "scale"), x, weight, shift, scale)
    _check_eps("rms_norm_modulate", eps)
    if dispatch.use_fused("rms_norm_modulate", x.device) and _kernel_takes(x, (weight,), (shift, scale)):
        return _fused("rms_norm_modulate")(x, weight, shift, scale, eps)
    return reference.rms_norm_modulate(x, weight, shift, scale, eps)


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    _check_floating("layer_norm_modulate", ("x", "shift", "scale"), x, shift, scale)
    _check_eps("layer_norm_modulate", eps)
    if dispatch.use_fused("layer_norm_modulate", x.device) and _kernel_takes(x, (), (shift, scale)):
        return _fused("layer_norm_modulate")(x, shift, scale, eps)
    return reference.layer_norm_modulate(x, shift, scale, eps)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    _check_floating("gated_residual", ("x", "gate", "y"), x, gate, y)
    if dispatch.use_fused("gated_residual", x.device) and _kernel_takes(x, (), (gate,)) and y.dtype == x.dtype:
        return _fused("gated_residual")(x, gate, y)
    return reference.gated_residual(x, gate, y)


def gated_residual_rms_norm_modulate(
    x: Tensor, gate: Tensor, y: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor]:
    _check_floating(
        "gated_residual_rms_norm_modulate",
        ("x", "gate", "y", "weight", "shift", "scale"),
        x,
        gate,
        y,
        weight,
        shift,
        scale,
    )
    _check_eps("gated_residual_rms_norm_modulate", eps)
    if (
        dispatch.use_fused("gated_residual_rms_norm_modulate", x.device)
        and y.dtype == x.dtype
        and _kernel_takes(x, (weight,), (gate, shift, scale))
    ):
        return _fused("gated_residual_rms_norm_modulate")(x, gate, y, weight, shift, scale, eps)
    return reference.gated_residual_rms_norm_modulate(x, gate, y, weight, shift, scale, eps)


# Operand dtypes autocast casts to its own dtype before a linear layer.
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear`, except that 16-bit products on a CPU without 16-bit matrix
    instructions run in float32 (same numbers up to summation order, 5-7x
    faster; `dispatch.use_float32_linear`), also under CPU autocast."""
    if x.device.type == "cpu":
        operands = (x, weight) if bias is None else (x, weight, bias)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            takes = all(t.dtype in _AUTOCAST_CASTS for t in operands)
        else:
            dtype = x.dtype
            takes = all(t.dtype == dtype for t in operands)
        if takes and dispatch.use_float32_linear(x, dtype):
            return float32_linear(x, weight, bias, dtype)
    return F.linear(x, weight, bias)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    _check_floating("swiglu", ("a", "b"), a, b)
    if dispatch.use_fused("swiglu", a.device) and a.dtype == b.dtype and _kernel_takes(a, (b,)):
        return _fused("swiglu")(a, b)
    return reference.swiglu(a, b)


@functools.lru_cache(maxsize=64)
def rope_frequencies(height: int, width: int, head_dim: int, device: torch.device) -> Tensor:
    """Cached 2D rotary table `[height*width, head_dim/2]` (complex64) on `device`."""
    return reference.rope_frequencies(height, width, head_dim, device)


def qk_norm_rope(
    qkv: Tensor, q_weight: Tensor, k_weight: Tensor, num_heads: int, freqs_cis: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_qkv("qk_norm_rope", qkv, q_weight, k_weight, num_heads, freqs_cis, eps)
    if (
        dispatch.use_fused("qk_norm_rope", qkv.device)
        and q_weight.dtype == k_weight.dtype
        and _kernel_takes(qkv, (q_weight, k_weight))
    ):
        return _fused("qk_norm_rope")(qkv, q_weight, k_weight, num_heads, torch.view_as_real(freqs_cis), eps)
    return reference.qk_norm_rope(qkv, q_weight, k_weight, num_heads, freqs_cis, eps)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Softmax attention on `[B, H, L, D]`; backend per `dispatch.attention_backend`."""
    _check_floating("attention", ("q", "k", "v"), q, k, v)
    backend = dispatch.attention_backend(q, k, v, mask)
    if backend == "ddt":
        return _fused("flash_attention")(q, k, v, q.shape[-1] ** -0.5)[0]
    if backend == "flash_attn":
        from flash_attn import flash_attn_func  # optional dependency

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return reference.attention(q, k, v, mask)


# Whether the fused qkv attention normalises k in a pre-pass (k alone, once)
# rather than in every query tile's prologue; benchmarks/bench_attention.py
# times both.
QKV_ATTENTION_K_PREPASS = True


def qkv_attention(
    qkv: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    num_heads: int,
    freqs_cis: Tensor,
    eps: float = 1e-6,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The model's whole attention from the packed projection `qkv` `[B, L, 3C]`:
    q/k RMSNorm + 2D rotary, softmax attention, heads merged -> `[B, L, C]`.
    Without autograd (sampling) the fused kernel when
    `dispatch.use_fused_qkv_attention` says so; else `qk_norm_rope` then
    `attention`."""
    _check_qkv("qkv_attention", qkv, q_weight, k_weight, num_heads, freqs_cis, eps)
    B, L, three_c = qkv.shape
    # Training takes the separate kernels: their forward saves q, k, v for the
    # backward, which the fused forward would have to recompute (measured
    # slower for forward + backward in benchmarks/bench_attention.py).
    training = torch.is_grad_enabled() and (qkv.requires_grad or q_weight.requires_grad or k_weight.requires_grad)
    if (
        not training
        and dispatch.use_fused_qkv_attention(qkv, num_heads, mask)
        and q_weight.dtype == k_weight.dtype
        and _kernel_takes(qkv, (q_weight, k_weight))
    ):
        head_dim = three_c // (3 * num_heads)
        return _fused("qkv_attention")(
            qkv,
            q_weight,
            k_weight,
            num_heads,
            torch.view_as_real(freqs_cis),
            eps,
            head_dim**-0.5,
            QKV_ATTENTION_K_PREPASS,
        )[0]
    q, k, v = qk_norm_rope(qkv, q_weight, k_weight, num_heads, freqs_cis, eps)
    return attention(q, k, v, mask).transpose(1, 2).reshape(B, L, three_c // 3)


def plan(device: torch.device) -> dict:
    """Which implementation each model op takes on `device` under the current backend."""
    device = torch.device(device)
    rows = {op: ("fused" if dispatch.use_fused(op, device) else "reference") for op in MODEL_OPS if op != "attention"}
    # a bf16 head-dim-72 probe on that device (the case DDT-XL runs)
    probe = torch.empty(1, 1, 1, 72, device=device if device.type == "cuda" else "meta", dtype=torch.bfloat16)
    rows["attention"] = dispatch.attention_backend(probe, probe, probe, None)
    qkv_probe = torch.empty(1, 1, 3 * 72, device=probe.device, dtype=torch.bfloat16)
    if dispatch.use_fused_qkv_attention(qkv_probe, 1):
        rows["attention"] = "ddt (fused q/k norm + rotary prologue)"
    # bf16 linear layers of FLOAT32_LINEAR_MIN_ROWS rows or more
    rows["linear_16bit"] = "float32" if dispatch.float32_linear_applies(device, torch.bfloat16) else "native"
    return rows


__all__ = [
    "MODEL_OPS",
    "KERNEL_OPS",
    "rms_norm_modulate",
    "layer_norm_modulate",
    "gated_residual",
    "gated_residual_rms_norm_modulate",
    "swiglu",
    "rope_frequencies",
    "qk_norm_rope",
    "attention",
    "qkv_attention",
    "QKV_ATTENTION_K_PREPASS",
    "plan",
    "reference",
    "dispatch",
    "get_backend",
    "set_backend",
    "get_attention_backend",
    "set_attention_backend",
    "use_backend",
    "has_fused_kernel",
    "auto_uses_fused",
    "linear",
    "get_cpu_linear",
    "set_cpu_linear",
]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
