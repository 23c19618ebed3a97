"""An independent, functional implementation of the DDT forward pass, written
straight from docs/spec.md ("The model") for the tests (no ddt_fast code is used).

It reads a state dict and computes in float64 unless told otherwise, so the
model under test can be compared against it.
"""

import math

import torch


def rope_angles(hp, wp, head_dim):
    """[L, D/2] angles, by the spec's loop definition."""
    xs = [16.0 * c / (wp - 1) if wp > 1 else 0.0 for c in range(wp)]
    ys = [16.0 * r / (hp - 1) if hp > 1 else 0.0 for r in range(hp)]
    out = torch.zeros(hp * wp, head_dim // 2, dtype=torch.float64)
    for r in range(hp):
        for c in range(wp):
            n = r * wp + c
            for k in range(head_dim // 4):
                f = 1.0 / (10000.0 ** (4.0 * k / head_dim))
                out[n, 2 * k] = xs[c] * f
                out[n, 2 * k + 1] = ys[r] * f
    return out


def rotate(v, angles):
    """v [B, L, H, D]: pair m = (v[2m], v[2m+1]) times exp(i * angles[:, m])."""
    re, im = v[..., 0::2], v[..., 1::2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    out = torch.empty_like(v)
    out[..., 0::2] = re * cos - im * sin
    out[..., 1::2] = re * sin + im * cos
    return out


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def timestep_embedding(t, dim=256, max_period=10.0):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(max_period) * k / half)
    arg = t.double()[:, None] * freqs[None]
    return torch.cat([arg.cos(), arg.sin()], -1)


def patches_by_loops(x, p):
    B, C, H, W = x.shape
    hp, wp = H // p, W // p
    out = torch.empty(B, hp * wp, C * p * p, dtype=x.dtype)
    for r in range(hp):
        for c in range(wp):
            for ch in range(C):
                for dy in range(p):
                    for dx in range(p):
                        out[:, r * wp + c, ch * p * p + dy * p + dx] = x[:, ch, r * p + dy, c * p + dx]
    return out


def spec_forward(sd, cfg, x, t, y, s=None, dtype=torch.float64):
    """(v, s) from the state dict `sd` of a DDT with config `cfg`."""
    g = {k: v.to(dtype) for k, v in sd.items()}
    lin = lambda h, name, bias=True: h @ g[name + ".weight"].T + (g[name + ".bias"] if bias else 0)
    C, nh, p = cfg["hidden_size"], cfg["num_groups"], cfg["patch_size"]
    D = C // nh
    B, Cin, H, W = x.shape
    hp, wp = H // p, W // p
    L = hp * wp
    patches = patches_by_loops(x.to(dtype), p)
    angles = rope_angles(hp, wp, D)

    temb = lin(torch.nn.functional.silu(lin(timestep_embedding(t).to(dtype), "t_embedder.mlp.0")), "t_embedder.mlp.2")[
        :, None
    ]
    yemb = g["y_embedder.embedding_table.weight"][y][:, None]
    c = torch.nn.functional.silu(temb + yemb)

    def block(i, h, cond):
        pre = f"blocks.{i}."
        m = lin(cond, pre + "adaLN_modulation.0").chunk(6, -1)
        a_in = rms(h, g[pre + "norm1.weight"]) * (1 + m[1]) + m[0]
        qkv = lin(a_in, pre + "attn.qkv", bias=False).view(B, L, 3, nh, D)
        q = rotate(rms(qkv[:, :, 0], g[pre + "attn.q_norm.weight"]), angles)
        k = rotate(rms(qkv[:, :, 1], g[pre + "attn.k_norm.weight"]), angles)
        v = qkv[:, :, 2]
        att = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(D)
        o = torch.einsum("bhlm,bmhd->blhd", att.softmax(-1), v).reshape(B, L, C)
        h = h + m[2] * lin(o, pre + "attn.proj")
        f_in = rms(h, g[pre + "norm2.weight"]) * (1 + m[4]) + m[3]
        a = lin(f_in, pre + "mlp.w1", bias=False)
        b = lin(f_in, pre + "mlp.w3", bias=False)
        return h + m[5] * lin(torch.nn.functional.silu(a) * b, pre + "mlp.w2", bias=False)

    E, N = cfg["num_encoder_blocks"], cfg["num_blocks"]
    if s is None:
        s = lin(patches, "s_embedder.proj")
        for i in range(E):
            s = block(i, s, c)
        s = torch.nn.functional.silu(temb + s)
    h = lin(patches, "x_embedder.proj")
    for i in range(E, N):
        h = block(i, h, s)
    shift, scale = lin(s, "final_layer.adaLN_modulation.0").chunk(2, -1)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    h = (h - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift
    out = lin(h, "final_layer.linear")  # [B, L, Cin*p*p]
    v = torch.empty(B, Cin, H, W, dtype=dtype)
    for r in range(hp):
        for cc in range(wp):
            v[:, :, r * p : (r + 1) * p, cc * p : (cc + 1) * p] = out[:, r * wp + cc].view(B, Cin, p, p)
    return v, s
