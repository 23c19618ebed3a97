"""Argument checks of the compiled ops, in Python, for their fake (meta)
implementations.

They mirror the checks of the C++ bindings (csrc/torch/*.cpp): the same
conditions in the same order, with the same messages, so that an op traced
with fake tensors (torch.compile) or called on meta tensors refuses what the
kernel would refuse. In particular every tensor argument must be on the device
of the op's main input: a meta tensor mixed with CPU tensors dispatches to the
fake implementation, which would otherwise hand back uninitialised tensors.
Only metadata (device, dtype, sizes, strides) and scalars are read.
"""

from __future__ import annotations

import math

import torch

from ddt_fast import _torch_private

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED = "float32, float64, float16, bfloat16"
NONE, RMS, LAYER = 0, 1, 2
ATTENTION_HEAD_DIMS = (64, 72, 128)


def _sizes(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# dtypes as the C++ messages print them (c10::ScalarType names)
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dt(dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def check(cond, message) -> None:
    """A RuntimeError with `message()` unless `cond` (symbolic sizes become a
    guard or a runtime assertion): `torch._check`."""
    _torch_private.check(cond, message)


def dtype_of(t, name: str) -> None:
    check(t.dtype in KERNEL_DTYPES, lambda: f"ddt_fast: {name} has dtype {_dt(t.dtype)}; supported: {SUPPORTED}")


def device(t, name: str, like, like_name: str) -> None:
    check(
        t.device == like.device,
        lambda: (
            f"ddt_fast: {name} is on {t.device} but {like_name} is on "
            f"{like.device}; move it with .to({like_name}.device)"
        ),
    )


def grad(g, name: str, like, like_name: str) -> None:
    device(g, name, like, like_name)
    dtype_of(g, name)


def eps_ok(eps) -> bool:
    """eps of a norm: finite and >= 0 (NaN fails both comparisons)."""
    return 0 <= eps < math.inf


def check_eps(eps) -> None:
    check(eps_ok(eps), lambda: f"ddt_fast: eps must be a finite number >= 0, got {eps} (the model uses 1e-6)")


def check_scale(scale) -> None:
    check(
        -math.inf < scale < math.inf,
        lambda: f"ddt_fast: scale must be finite, got {scale} (softmax attention uses head_dim ** -0.5)",
    )


def check_num_heads(num_heads: int, width) -> None:
    check(num_heads > 0, lambda: f"ddt_fast: num_heads must be > 0, got {num_heads}")
    check(
        width % 3 == 0 and (width // 3) % num_heads == 0,
        lambda: (
            f"ddt_fast: qkv's last dim {width} is not 3 * num_heads ({num_heads}) * head_dim; num_heads "
            f"must divide C = {width // 3} and qkv be [B, L, 3C]"
        ),
    )


# norm + modulate family (csrc/torch/norm_modulate.cpp) -----------------------


def _same_dtype(t, want, name: str) -> None:
    check(
        t.dtype == want or t.dtype == torch.float32,
        lambda: f"ddt_fast: {name} must be the dtype of x ({_dt(want)}) or float32, got {_dt(t.dtype)}",
    )


def _mod_rows(t, name: str, x) -> None:
    B, L, C = x.shape
    check(
        t.dim() == 3 and t.shape[0] == B and (t.shape[1] == 1 or t.shape[1] == L) and t.shape[2] == C,
        lambda: (
            f"ddt_fast: {name} must be [B, 1, C] (per sample) or [B, L, C] (per token) = [{B}, 1|{L}, {C}], "
            f"got {_sizes(t)}"
        ),
    )
    check(
        t.stride(2) == 1,
        lambda: f"ddt_fast: {name} must be contiguous in its last dim (got stride {t.stride(2)}); call .contiguous()",
    )
    device(t, name, x, "x")


def norm_modulate(x, gate, y, weight, shift, scale, eps, kind: int) -> None:
    """The forward ops' checks; `gate` given means a gated residual."""
    check_eps(eps)
    check(x.dim() == 3, lambda: f"ddt_fast: x must be [B, L, C], got {_sizes(x)}")
    check(x.shape[2] > 0, lambda: "ddt_fast: x has an empty channel dim")
    dtype_of(x, "x")
    mod_dtype = []

    def take_mod(t, name):
        _same_dtype(t, x.dtype, name)
        check(
            not mod_dtype or mod_dtype[0] == t.dtype,
            lambda: (
                f"ddt_fast: shift, scale and gate must share one dtype, got {_dt(mod_dtype[0])} and "
                f"{_dt(t.dtype)} ({name})"
            ),
        )
        mod_dtype[:] = [t.dtype]
        _mod_rows(t, name, x)

    if gate is not None:
        check(y is not None, lambda: "ddt_fast: a gated residual needs y (the branch output, like x); got None")
        check(
            y.shape == x.shape and y.dtype == x.dtype and y.device == x.device,
            lambda: (
                f"ddt_fast: y must match x ({_sizes(x)}, {_dt(x.dtype)}, {x.device}), got {_sizes(y)}, "
                f"{_dt(y.dtype)}, {y.device}"
            ),
        )
        take_mod(gate, "gate")
    if kind != NONE:
        kind_name = "1 (rms)" if kind == RMS else "2 (layer)"
        check(shift is not None, lambda: f"ddt_fast: norm kind {kind_name} needs shift ([B, 1|L, C]); got None")
        check(scale is not None, lambda: f"ddt_fast: norm kind {kind_name} needs scale ([B, 1|L, C]); got None")
        take_mod(shift, "shift")
        take_mod(scale, "scale")
    if kind == RMS:
        C = x.shape[2]
        check(weight is not None, lambda: f"ddt_fast: norm kind 1 (rms) needs weight ([C] = [{C}]); got None")
        check(
            weight.dim() == 1 and weight.shape[0] == C,
            lambda: f"ddt_fast: weight must be [C] = [{C}], got {_sizes(weight)}",
        )
        device(weight, "weight", x, "x")
        _same_dtype(weight, x.dtype, "weight")


def norm_modulate_backward(grad_out, grad_x_out, x, gate, y, weight, shift, scale, eps, kind, residual) -> None:
    check(kind in (NONE, RMS, LAYER), lambda: f"ddt_fast: kind must be 0 (none), 1 (rms) or 2 (layer), got {kind}")
    for t, name in (
        (grad_out, "grad_out"),
        (grad_x_out, "grad_x_out"),
        (gate, "gate"),
        (y, "y"),
        (weight, "weight"),
        (shift, "shift"),
        (scale, "scale"),
    ):
        if t is not None:
            device(t, name, x, "x")
    check(not residual or gate is not None, lambda: "ddt_fast: residual=True needs gate ([B, 1|L, C]); got None")
    check(not residual or y is not None, lambda: "ddt_fast: residual=True needs y (like x); got None")
    norm_modulate(
        x, gate if residual else None, y if residual else None, weight if kind == RMS else None, shift, scale, eps, kind
    )
    if kind != NONE:
        check(
            grad_out is not None,
            lambda: f"ddt_fast: norm_modulate_backward with norm kind {kind} needs grad_out (like x); got None",
        )
        grad(grad_out, "grad_out", x, "x")
        check(grad_out.shape == x.shape, lambda: f"ddt_fast: grad_out must be {_sizes(x)}, got {_sizes(grad_out)}")
    if residual and grad_x_out is not None:
        grad(grad_x_out, "grad_x_out", x, "x")
        check(
            grad_x_out.shape == x.shape, lambda: f"ddt_fast: grad_x_out must be {_sizes(x)}, got {_sizes(grad_x_out)}"
        )


# q/k RMSNorm + rotary (csrc/torch/qk_norm_rope.cpp) ---------------------------


def _qk_weights(q_weight, k_weight, D, qkv) -> None:
    for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        check(
            w.dim() == 1 and w.shape[0] == D,
            lambda: f"ddt_fast: {name}: q/k norm weights must be [head_dim] = [{D}], got {_sizes(w)}",
        )
        check(
            w.dtype == qkv.dtype or w.dtype == torch.float32,
            lambda: (
                f"ddt_fast: {name}: q/k norm weights must have qkv's dtype ({_dt(qkv.dtype)}) or float32, "
                f"got {_dt(w.dtype)}"
            ),
        )
        device(w, name, qkv, "qkv")
    check(
        q_weight.dtype == k_weight.dtype,
        lambda: f"ddt_fast: q_weight and k_weight differ in dtype ({_dt(q_weight.dtype)} and {_dt(k_weight.dtype)})",
    )


def _rope(rope, L, D, qkv) -> None:
    check(
        rope.dtype == torch.float32
        and rope.dim() == 3
        and rope.shape[0] == L
        and rope.shape[1] == D // 2
        and rope.shape[2] == 2,
        lambda: (
            f"ddt_fast: rope must be float32 [L, D/2, 2] = [{L}, {D // 2}, 2] (cos, sin), got {_dt(rope.dtype)} "
            f"{_sizes(rope)}"
        ),
    )
    device(rope, "rope", qkv, "qkv")


def qk_norm_rope(qkv, q_weight, k_weight, num_heads, rope, eps):
    """Returns (B, L, head_dim)."""
    check(qkv.dim() == 3, lambda: f"ddt_fast: qkv must be [B, L, 3C], got {_sizes(qkv)}")
    check_num_heads(num_heads, qkv.shape[2])
    check_eps(eps)
    dtype_of(qkv, "qkv")
    B, L, width = qkv.shape
    D = width // (3 * num_heads)
    check(D % 4 == 0, lambda: f"ddt_fast: head dim {D} must be a multiple of 4 for the 2D rotary embedding")
    _qk_weights(q_weight, k_weight, D, qkv)
    _rope(rope, L, D, qkv)
    return B, L, D


def qk_norm_rope_backward(grad_q, grad_k, grad_v, qkv, q_weight, k_weight, num_heads, rope, eps) -> None:
    B, L, D = qk_norm_rope(qkv, q_weight, k_weight, num_heads, rope, eps)
    for g, name in ((grad_q, "grad_q"), (grad_k, "grad_k"), (grad_v, "grad_v")):
        if g is None:
            continue
        grad(g, name, qkv, "qkv")
        check(
            g.dim() == 4 and tuple(g.shape) == (B, num_heads, L, D),
            lambda: (
                f"ddt_fast: {name}: qk_norm_rope gradients must be [B, H, L, D] = [{B}, {num_heads}, {L}, "
                f"{D}], got {_sizes(g)}"
            ),
        )


# SwiGLU (csrc/torch/swiglu.cpp) ------------------------------------------------


def swiglu(a, b) -> None:
    check(
        a.dim() >= 1 and a.shape == b.shape,
        lambda: f"ddt_fast: swiglu needs a and b of one shape, got {_sizes(a)} and {_sizes(b)}",
    )
    check(
        a.dtype == b.dtype,
        lambda: f"ddt_fast: swiglu needs a and b of one dtype, got {_dt(a.dtype)} and {_dt(b.dtype)}",
    )
    device(b, "b", a, "a")
    dtype_of(a, "a")


def swiglu_backward(grad_out, a, b) -> None:
    swiglu(a, b)
    grad(grad_out, "grad_out", a, "a")
    check(grad_out.shape == a.shape, lambda: f"ddt_fast: grad_out must be {_sizes(a)}, got {_sizes(grad_out)}")


# flash attention (csrc/torch/attention.cpp; CUDA kernels, traced on meta too) ---


def _on_cuda(t, name: str, what: str) -> None:
    check(
        t.device.type in ("cuda", "meta"),
        lambda: (
            f"ddt_fast: {what} runs on CUDA tensors; {name} is on {t.device} "
            "(use torch.nn.functional.scaled_dot_product_attention on the CPU)"
        ),
    )


def _bhld(t, name: str, like) -> None:
    check(t.dim() == 4, lambda: f"ddt_fast: attention expects {name} as [B, H, L, D], got {_sizes(t)}")
    _on_cuda(t, name, "the flash-attention kernel")
    check(
        t.dtype == like.dtype,
        lambda: f"ddt_fast: attention inputs differ in dtype ({name} is {_dt(t.dtype)}, q is {_dt(like.dtype)})",
    )
    device(t, name, like, "q")
    check(
        t.shape[0] == like.shape[0] and t.shape[1] == like.shape[1] and t.shape[3] == like.shape[3],
        lambda: f"ddt_fast: {name} has shape {_sizes(t)}, incompatible with q {_sizes(like)}",
    )


def _head_dim_and_dtype(D, t, name: str) -> None:
    check(
        D in ATTENTION_HEAD_DIMS,
        lambda: (
            f"ddt_fast: the flash-attention kernel supports head dims 64, 72 and 128, got {D}; use "
            "DDT_FAST_ATTENTION=sdpa (ddt_fast.ops.attention falls back by itself)"
        ),
    )
    check(
        t.dtype in (torch.bfloat16, torch.float16),
        lambda: f"ddt_fast: {name} has dtype {_dt(t.dtype)}; the flash-attention kernel takes bfloat16 or float16",
    )


def flash_attention(q, k, v, scale) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _bhld(t, name, q)
    check(k.shape[2] == v.shape[2], lambda: f"ddt_fast: k and v differ in length: {_sizes(k)} vs {_sizes(v)}")
    _head_dim_and_dtype(q.shape[3], q, "q")
    check_scale(scale)
    check(k.shape[2] > 0 or q.shape[2] == 0, lambda: "ddt_fast: attention over zero keys is undefined")


def flash_attention_backward(grad_out, q, k, v, out, lse, scale) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out"), (grad_out, "grad_out")):
        _bhld(t, name, q)
    B, H, Lq, D = q.shape
    _head_dim_and_dtype(D, q, "q")
    check_scale(scale)
    check(out.shape == q.shape, lambda: f"ddt_fast: out must be shaped like q {_sizes(q)}, got {_sizes(out)}")
    check(
        grad_out.shape == q.shape,
        lambda: f"ddt_fast: grad_out must be shaped like q {_sizes(q)}, got {_sizes(grad_out)}",
    )
    check(v.shape == k.shape, lambda: f"ddt_fast: v must be shaped like k {_sizes(k)}, got {_sizes(v)}")
    check(k.shape[2] > 0 or Lq == 0, lambda: "ddt_fast: attention over zero keys is undefined")
    check(
        lse.dtype == torch.float32 and lse.dim() == 3 and tuple(lse.shape) == (B, H, Lq),
        lambda: f"ddt_fast: lse must be float32 [B, H, Lq] = [{B}, {H}, {Lq}], got {_dt(lse.dtype)} {_sizes(lse)}",
    )
    device(lse, "lse", q, "q")


def qkv_attention(qkv, q_weight, k_weight, num_heads, rope, eps, scale) -> None:
    check(qkv.dim() == 3, lambda: f"ddt_fast: qkv must be [B, L, 3C], got {_sizes(qkv)}")
    _on_cuda(qkv, "qkv", "qkv_attention")
    check_num_heads(num_heads, qkv.shape[2])
    B, L, width = qkv.shape
    D = width // (3 * num_heads)
    _head_dim_and_dtype(D, qkv, "qkv")
    check_eps(eps)
    check_scale(scale)
    _qk_weights(q_weight, k_weight, D, qkv)
    _rope(rope, L, D, qkv)


# DP schedule solver (csrc/torch/dp_schedule.cpp) -------------------------------


def dp_schedule_solve(sim, k_max) -> None:
    """All but the finite check, which needs the values."""
    check(
        sim.dim() == 3,
        lambda: f"dp_schedule_solve: sim must be 3-D [B, N, N], got {sim.dim()}-D with shape {_sizes(sim)}",
    )
    check(
        sim.shape[1] == sim.shape[2],
        lambda: f"dp_schedule_solve: sim must be square in its last two dimensions, got shape {_sizes(sim)}",
    )
    n = sim.shape[1]
    check(n >= 1, lambda: "dp_schedule_solve: sim needs at least one step (N >= 1), got N = 0")
    check(1 <= k_max and k_max <= n, lambda: f"dp_schedule_solve: k_max must be in 1..N = 1..{n}, got {k_max}")
    check(
        sim.dtype in (torch.float32, torch.float64),
        lambda: (
            f"dp_schedule_solve: sim must be float32 or float64, got {_dt(sim.dtype)}; convert it with sim.double()"
        ),
    )
