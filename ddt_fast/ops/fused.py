"""Fake (meta) and autograd registrations for the compiled ops.

The C++ side (csrc/torch/) defines the schemas and the CPU/CUDA kernels;
here each op gets the shape function torch.compile needs and a backward
that calls the fused backward kernel. The shape functions check their
arguments as the kernels do (ops/_checks.py): a fake (or meta) call refuses
what the real one would.
"""

from __future__ import annotations

import torch

from ddt_fast import _extension
from ddt_fast.ops import _checks

__all__ = ["register"]

_NONE, _RMS, _LAYER = _checks.NONE, _checks.RMS, _checks.LAYER


def _maybe(t: torch.Tensor):
    return None if t.numel() == 0 and t.dim() == 1 else t


def _register_norm_modulate() -> None:
    lib = "ddt_fast::"

    @torch.library.register_fake(lib + "rms_norm_modulate")
    def _(x, weight, shift, scale, eps):
        _checks.norm_modulate(x, None, None, weight, shift, scale, eps, _RMS)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "layer_norm_modulate")
    def _(x, shift, scale, eps):
        _checks.norm_modulate(x, None, None, None, shift, scale, eps, _LAYER)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "gated_residual")
    def _(x, gate, y):
        _checks.norm_modulate(x, gate, y, None, None, None, 0.0, _NONE)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "gated_residual_rms_norm_modulate")
    def _(x, gate, y, weight, shift, scale, eps):
        _checks.norm_modulate(x, gate, y, weight, shift, scale, eps, _RMS)
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake(lib + "norm_modulate_backward")
    def _(grad_out, grad_x_out, x, gate, y, weight, shift, scale, eps, kind, residual):
        _checks.norm_modulate_backward(grad_out, grad_x_out, x, gate, y, weight, shift, scale, eps, kind, residual)
        B, L, C = x.shape
        empty = x.new_empty(0)

        def mod(t):
            return x.new_empty((B, t.shape[1], C), dtype=t.dtype)

        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format) if residual else empty,
            mod(gate) if residual else empty,
            torch.empty_like(weight) if kind == _RMS else empty,
            mod(shift) if kind != _NONE else empty,
            mod(scale) if kind != _NONE else empty,
        )

    backward = torch.ops.ddt_fast.norm_modulate_backward

    # rms_norm_modulate(x, weight, shift, scale, eps)
    def setup_rms(ctx, inputs, output):
        x, weight, shift, scale, eps = inputs
        ctx.save_for_backward(x, weight, shift, scale)
        ctx.eps = eps

    def backward_rms(ctx, grad):
        x, weight, shift, scale = ctx.saved_tensors
        gx, _, _, gw, gsh, gsc = backward(grad, None, x, None, None, weight, shift, scale, ctx.eps, _RMS, False)
        return gx, gw, gsh, gsc, None

    torch.library.register_autograd(lib + "rms_norm_modulate", backward_rms, setup_context=setup_rms)

    # layer_norm_modulate(x, shift, scale, eps)
    def setup_ln(ctx, inputs, output):
        x, shift, scale, eps = inputs
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps

    def backward_ln(ctx, grad):
        x, shift, scale = ctx.saved_tensors
        gx, _, _, _, gsh, gsc = backward(grad, None, x, None, None, None, shift, scale, ctx.eps, _LAYER, False)
        return gx, gsh, gsc, None

    torch.library.register_autograd(lib + "layer_norm_modulate", backward_ln, setup_context=setup_ln)

    # gated_residual(x, gate, y)
    def setup_gr(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(output, gate, y)

    def backward_gr(ctx, grad):
        x_out, gate, y = ctx.saved_tensors
        gx, gy, gg, _, _, _ = backward(None, grad, x_out, gate, y, None, None, None, 0.0, _NONE, True)
        return gx, gg, gy

    torch.library.register_autograd(lib + "gated_residual", backward_gr, setup_context=setup_gr)

    # gated_residual_rms_norm_modulate(x, gate, y, weight, shift, scale, eps) -> (x_out, out)
    def setup_grn(ctx, inputs, output):
        x, gate, y, weight, shift, scale, eps = inputs
        ctx.save_for_backward(output[0], gate, y, weight, shift, scale)
        ctx.eps = eps

    def backward_grn(ctx, grad_x_out, grad_out):
        x_out, gate, y, weight, shift, scale = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(x_out)
        gx, gy, gg, gw, gsh, gsc = backward(
            grad_out, grad_x_out, x_out, gate, y, weight, shift, scale, ctx.eps, _RMS, True
        )
        return gx, gg, gy, gw, gsh, gsc, None

    torch.library.register_autograd(lib + "gated_residual_rms_norm_modulate", backward_grn, setup_context=setup_grn)


def _register_qk_norm_rope() -> None:
    name = "ddt_fast::qk_norm_rope"

    @torch.library.register_fake(name)
    def _(qkv, q_weight, k_weight, num_heads, rope, eps):
        B, L, D = _checks.qk_norm_rope(qkv, q_weight, k_weight, num_heads, rope, eps)
        return tuple(qkv.new_empty((B, num_heads, L, D)) for _ in range(3))

    @torch.library.register_fake(name + "_backward")
    def _(grad_q, grad_k, grad_v, qkv, q_weight, k_weight, num_heads, rope, eps):
        _checks.qk_norm_rope_backward(grad_q, grad_k, grad_v, qkv, q_weight, k_weight, num_heads, rope, eps)
        return (
            torch.empty_like(qkv, memory_format=torch.contiguous_format),
            torch.empty_like(q_weight),
            torch.empty_like(k_weight),
        )

    def setup(ctx, inputs, output):
        qkv, q_weight, k_weight, num_heads, rope, eps = inputs
        ctx.save_for_backward(qkv, q_weight, k_weight, rope)
        ctx.num_heads, ctx.eps = num_heads, eps

    def backward(ctx, grad_q, grad_k, grad_v):
        qkv, q_weight, k_weight, rope = ctx.saved_tensors
        g_qkv, g_qw, g_kw = torch.ops.ddt_fast.qk_norm_rope_backward(
            grad_q, grad_k, grad_v, qkv, q_weight, k_weight, ctx.num_heads, rope, ctx.eps
        )
        return g_qkv, g_qw, g_kw, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup)


def _register_swiglu() -> None:
    name = "ddt_fast::swiglu"

    @torch.library.register_fake(name)
    def _(a, b):
        _checks.swiglu(a, b)
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    @torch.library.register_fake(name + "_backward")
    def _(grad_out, a, b):
        _checks.swiglu_backward(grad_out, a, b)
        return (
            torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(a, memory_format=torch.contiguous_format),
        )

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.ops.ddt_fast.swiglu_backward(grad, a, b)

    torch.library.register_autograd(name, backward, setup_context=setup)


def _register_attention() -> None:
    lib = "ddt_fast::"

    @torch.library.register_fake(lib + "flash_attention")
    def _(q, k, v, scale):
        _checks.flash_attention(q, k, v, scale)
        B, H, Lq, D = q.shape
        # stored [B, Lq, H, D] so that merging the heads afterwards is a view
        return q.new_empty((B, Lq, H, D)).transpose(1, 2), q.new_empty((B, H, Lq), dtype=torch.float32)

    @torch.library.register_fake(lib + "flash_attention_backward")
    def _(grad_out, q, k, v, out, lse, scale):
        _checks.flash_attention_backward(grad_out, q, k, v, out, lse, scale)
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))

    @torch.library.register_fake(lib + "qkv_attention")
    def _(qkv, q_weight, k_weight, num_heads, rope, eps, scale, k_prepass=True):
        _checks.qkv_attention(qkv, q_weight, k_weight, num_heads, rope, eps, scale)
        B, L, three_c = qkv.shape
        return qkv.new_empty((B, L, three_c // 3)), qkv.new_empty((B, num_heads, L), dtype=torch.float32)

    backward_kernel = torch.ops.ddt_fast.flash_attention_backward

    def setup(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        gq, gk, gv = backward_kernel(grad_out, q, k, v, out, lse, ctx.scale)
        return gq, gk, gv, None

    torch.library.register_autograd(lib + "flash_attention", backward, setup_context=setup)

    # qkv_attention: the backward recomputes q, k, v (qk_norm_rope), runs the
    # flash backward, then the qk_norm_rope backward to reach qkv and the weights.
    def setup_qkv(ctx, inputs, output):
        qkv, q_weight, k_weight, num_heads, rope, eps, scale, *_ = inputs
        out, lse = output
        ctx.save_for_backward(qkv, q_weight, k_weight, rope, out, lse)
        ctx.num_heads, ctx.eps, ctx.scale = num_heads, eps, scale

    def backward_qkv(ctx, grad_out, grad_lse):
        qkv, q_weight, k_weight, rope, out, lse = ctx.saved_tensors
        B, L, C = out.shape
        H = ctx.num_heads

        def heads(t):  # [B, L, C] -> [B, H, L, D] view
            return t.view(B, L, H, C // H).transpose(1, 2)

        q, k, v = torch.ops.ddt_fast.qk_norm_rope(qkv, q_weight, k_weight, H, rope, ctx.eps)
        gq, gk, gv = backward_kernel(heads(grad_out.contiguous()), q, k, v, heads(out), lse, ctx.scale)
        g_qkv, g_qw, g_kw = torch.ops.ddt_fast.qk_norm_rope_backward(
            gq, gk, gv, qkv, q_weight, k_weight, H, rope, ctx.eps
        )
        return g_qkv, g_qw, g_kw, None, None, None, None, None

    torch.library.register_autograd(lib + "qkv_attention", backward_qkv, setup_context=setup_qkv)


def register() -> None:
    if not _extension.available():
        return
    if hasattr(torch.ops.ddt_fast, "rms_norm_modulate"):
        _register_norm_modulate()
    if hasattr(torch.ops.ddt_fast, "qk_norm_rope"):
        _register_qk_norm_rope()
    if hasattr(torch.ops.ddt_fast, "swiglu"):
        _register_swiglu()
    if hasattr(torch.ops.ddt_fast, "flash_attention"):
        _register_attention()


register()
