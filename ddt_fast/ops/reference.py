"""Pure-PyTorch reference for every op the DDT model calls.

Each function follows docs/spec.md ("The model") line by line, including where it
rounds, so that a model built on these functions gives the published model's
numbers. The fused kernels in csrc/ are checked against these.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "modulate",
    "rms_norm_modulate",
    "layer_norm_modulate",
    "gated_residual",
    "gated_residual_rms_norm_modulate",
    "swiglu",
    "rope_frequencies",
    "apply_rope",
    "qk_norm_rope",
    "attention",
]

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """`x * rsqrt(mean(x^2) + eps)` in float32, cast back to x's dtype, then `* weight`."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return n if weight is None else n * weight


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def rms_norm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN input of a block: `RMSNorm(x) * (1 + scale) + shift`.

    shift/scale are `[B, 1, C]` (per sample, encoder) or `[B, L, C]` (per token,
    decoder), typically strided views from `chunk(6, -1)`.
    """
    return modulate(rms_norm(x, weight, eps), shift, scale)


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Final layer: weight-free LayerNorm, then `* (1 + scale) + shift`."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y


def gated_residual_rms_norm_modulate(
    x: Tensor, gate: Tensor, y: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor]:
    """`x' = x + gate * y` and the next adaLN input `RMSNorm(x') * (1 + scale) + shift`."""
    x = gated_residual(x, gate, y)
    return x, rms_norm_modulate(x, weight, shift, scale, eps)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    return F.silu(a) * b


def rope_frequencies(height: int, width: int, head_dim: int, device=None) -> Tensor:
    """2D rotary table `[height*width, head_dim/2]` (complex64) for an Hp x Wp token grid.

    Positions are normalised to [0, 16] on both axes; pair 2k rotates by
    `x * f_k`, pair 2k+1 by `y * f_k`, with `f_k = 10000^(-4k/D)`. Built on the
    CPU in float32 (as the published model does), then moved to `device`.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2D rotary embedding needs a head dim divisible by 4, got {head_dim}")
    xs = torch.linspace(0, 16, width)
    ys = torch.linspace(0, 16, height)
    y_pos, x_pos = torch.meshgrid(ys, xs, indexing="ij")
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    x_angles = torch.outer(x_pos.reshape(-1), freqs)
    y_angles = torch.outer(y_pos.reshape(-1), freqs)
    x_cis = torch.polar(torch.ones_like(x_angles), x_angles)
    y_cis = torch.polar(torch.ones_like(y_angles), y_angles)
    table = torch.stack([x_cis, y_cis], dim=-1).reshape(height * width, head_dim // 2)
    return table.to(device) if device is not None else table


def apply_rope(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent pairs of `x` `[B, L, H, D]` by `freqs_cis` `[L, D/2]`, in float32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


def qk_norm_rope(
    qkv: Tensor, q_weight: Tensor, k_weight: Tensor, num_heads: int, freqs_cis: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor, Tensor]:
    """Split packed `qkv` `[B, L, 3C]` into heads, RMSNorm q and k over D, rotate them.

    Returns q, k, v as `[B, heads, L, D]` (the layout attention reads).
    """
    B, L, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    q, k, v = qkv.view(B, L, 3, num_heads, head_dim).unbind(2)
    q = apply_rope(rms_norm(q, q_weight, eps), freqs_cis)
    k = apply_rope(rms_norm(k, k_weight, eps), freqs_cis)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Softmax attention, scale 1/sqrt(D), no dropout; `[B, H, L, D]` in and out."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
