"""Benchmark: ddt_fast's flash-attention kernel against the attention a user would otherwise run.

    python benchmarks/bench_attention.py [--quick] [--repeats N] [--out FILE]

Needs a CUDA GPU (prints a note and exits 0 without one). For DDT shapes,
self-attention with L = 256 tokens (256 px) and L = 1024 (512 px), head dims
64 (DDT-B/L) and 72 (DDT-XL), bf16:

* forward, and forward + backward, TFLOP/s of: `ddt` (torch.ops.ddt_fast.
  flash_attention), SDPA's flash backend (FlashAttention-2 inside PyTorch),
  SDPA's cuDNN backend, SDPA's memory-efficient backend, and `flash_attn`
  when it is installed;
* the model's whole attention from the packed `qkv` projection: the fused
  prologue (`qkv_attention`: k normalised by a k-only pre-pass, q's RMSNorm +
  rotary in the attention kernel's prologue, v read from the packed tensor,
  heads merged on store), its one-kernel variant (k normalised in every query
  tile's prologue as well), the same work as separate kernels (ddt_fast's
  qk_norm_rope kernel, then flash_attention), and the published path (PyTorch
  ops for the norms and rotary, SDPA, transpose).

FLOPs: forward 4 * B * H * L^2 * D (two matmuls), backward 2.5x that (five
matmuls; the convention of the FlashAttention papers, whatever recomputation
an implementation does). Times: CUDA events, implementations interleaved,
median of `--repeats`. Writes benchmarks/results/attention_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from common import device_tag, machine_info, result_path, timed_interleaved, write_json

import ddt_fast  # noqa: E402,F401
from ddt_fast import _extension, ops  # noqa: E402
from ddt_fast.ops import reference  # noqa: E402

# (name, B, H, L, D): DDT-XL at 256 px (batch 64) and 512 px (batch 16); DDT-B likewise.
SHAPES = [
    ("XL/2 256px", 64, 16, 256, 72),
    ("XL/2 512px", 16, 16, 1024, 72),
    ("B/2 256px", 64, 12, 256, 64),
    ("B/2 512px", 16, 12, 1024, 64),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[1]]


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]
    return sdpa_kernel(backend)


def attention_impls():
    f = torch.ops.ddt_fast
    impls = {"ddt": (contextlib.nullcontext, lambda q, k, v: f.flash_attention(q, k, v, q.shape[-1] ** -0.5)[0])}
    for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
        impls[name] = (lambda name=name: sdpa_backend(name), F.scaled_dot_product_attention)
    if ops.dispatch.flash_attn_importable():
        from flash_attn import flash_attn_func

        impls["flash_attn"] = (
            contextlib.nullcontext,
            lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
        )
    return impls


def runnable(ctx, fn, q, k, v):
    """None if `fn` runs on these inputs, else the reason it does not."""
    try:
        with ctx():
            fn(q, k, v)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - a backend that refuses a shape is a result
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def bench_attention(shapes, repeats):
    rows = []
    for label, B, H, L, D in shapes:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        flops_fwd = 4.0 * B * H * L * L * D
        fwd, fwd_bwd, skipped = {}, {}, {}
        for name, (ctx, fn) in attention_impls().items():
            why = runnable(ctx, fn, q, k, v)
            if why:
                skipped[name] = why
                continue

            # (q, k, v and grad are bound in this iteration; the `del` at its
            # end frees them before the next shape is allocated)
            def forward(ctx=ctx, fn=fn):
                with ctx(), torch.no_grad():
                    fn(q, k, v)  # noqa: F821

            def forward_backward(ctx=ctx, fn=fn):
                with ctx():
                    out = fn(q, k, v)  # noqa: F821
                    torch.autograd.grad(out, (q, k, v), grad)  # noqa: F821

            fwd[name], fwd_bwd[name] = forward, forward_backward
        t_fwd = timed_interleaved(fwd, repeats=repeats, warmup=3, cuda=True)
        t_all = timed_interleaved(fwd_bwd, repeats=repeats, warmup=3, cuda=True)
        row = {"shape": label, "B": B, "H": H, "L": L, "D": D, "skipped": skipped, "impls": {}}
        for name in fwd:
            tf, ta = t_fwd[name]["median_s"], t_all[name]["median_s"]
            row["impls"][name] = {
                "fwd_ms": tf * 1e3,
                "fwd_bwd_ms": ta * 1e3,
                "fwd_tflops": flops_fwd / tf / 1e12,
                "fwd_bwd_tflops": 3.5 * flops_fwd / ta / 1e12,
            }
        ours = row["impls"]["ddt"]
        row["ratios"] = {f"fwd_vs_{n}": r["fwd_ms"] / ours["fwd_ms"] for n, r in row["impls"].items() if n != "ddt"}
        row["ratios"].update(
            {f"fwd_bwd_vs_{n}": r["fwd_bwd_ms"] / ours["fwd_bwd_ms"] for n, r in row["impls"].items() if n != "ddt"}
        )
        rows.append(row)
        del q, k, v, grad
    return rows


def bench_prologue(shapes, repeats):
    """The model's attention from qkv: one kernel vs separate kernels vs the published ops."""
    f = torch.ops.ddt_fast
    rows = []
    for label, B, H, L, D in shapes:
        side = int(L**0.5)
        qkv = torch.randn(B, L, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        qw = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
        kw = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
        freqs = ops.rope_frequencies(side, side, D, torch.device("cuda"))
        rope = torch.view_as_real(freqs).contiguous()
        grad = torch.randn(B, L, H * D, device="cuda", dtype=torch.bfloat16)
        scale = D**-0.5

        def fused():  # k normalised once by a pre-pass, q in the attention prologue
            return f.qkv_attention(qkv, qw, kw, H, rope, 1e-6, scale, True)[0]

        def one_kernel():  # q and k normalised in the prologue of every query tile
            return f.qkv_attention(qkv, qw, kw, H, rope, 1e-6, scale, False)[0]

        def separate():
            q, k, v = f.qk_norm_rope(qkv, qw, kw, H, rope, 1e-6)
            return f.flash_attention(q, k, v, scale)[0].transpose(1, 2).reshape(B, L, H * D)

        def published():
            q, k, v = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)

        impls = {
            "fused_prologue": fused,
            "fused_one_kernel": one_kernel,
            "separate_kernels": separate,
            "published_ops_sdpa": published,
        }

        def fwd_only(fn):
            def run():
                with torch.no_grad():
                    fn()

            return run

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(), (qkv, qw, kw), grad)

        t_fwd = timed_interleaved({n: fwd_only(fn) for n, fn in impls.items()}, repeats=repeats, warmup=3, cuda=True)
        t_all = timed_interleaved({n: fwd_bwd(fn) for n, fn in impls.items()}, repeats=repeats, warmup=3, cuda=True)
        row = {"shape": label, "B": B, "H": H, "L": L, "D": D, "impls": {}}
        for n in impls:
            row["impls"][n] = {"fwd_ms": t_fwd[n]["median_s"] * 1e3, "fwd_bwd_ms": t_all[n]["median_s"] * 1e3}
        ours = row["impls"]["fused_prologue"]
        row["ratios"] = {
            f"fwd_vs_{n}": r["fwd_ms"] / ours["fwd_ms"] for n, r in row["impls"].items() if n != "fused_prologue"
        }
        row["ratios"].update(
            {
                f"fwd_bwd_vs_{n}": r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                for n, r in row["impls"].items()
                if n != "fused_prologue"
            }
        )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="XL shapes only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 30, quick 10)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (none visible to PyTorch); nothing measured.")
        return 0
    if not _extension.has_kernel("flash_attention", "CUDA"):
        print("bench_attention: ddt_fast._C was built without the CUDA attention kernels.", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    repeats = args.repeats or (10 if args.quick else 30)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    info = machine_info(device)
    torch.manual_seed(0)
    attention = bench_attention(shapes, repeats)
    prologue = bench_prologue(shapes, repeats)
    payload = {
        "benchmark": "attention",
        "machine": info,
        "quick": args.quick,
        "repeats": repeats,
        "dtype": "bfloat16",
        "attention": attention,
        "prologue": prologue,
        "targets_h100": {
            "D72_L1024_fwd_vs_sdpa_flash": 1.2,
            "D72_L1024_fwd_vs_sdpa_cudnn": 1.0,
            "prologue_vs_separate": 1.0,
        },
    }
    path = args.out or result_path(f"attention_{device_tag(device)}{'_quick' if args.quick else ''}.json")
    write_json(path, payload)

    print(f"\n{info['gpu']}  (bf16, median of {repeats}; TFLOP/s fwd | fwd+bwd)")
    for row in attention:
        cells = "  ".join(f"{n} {r['fwd_tflops']:.0f}|{r['fwd_bwd_tflops']:.0f}" for n, r in row["impls"].items())
        print(f"{row['shape']:>11} L={row['L']:<5} D={row['D']:<4} {cells}")
        for n, why in row["skipped"].items():
            print(f"{'':>11} {n}: not run ({why})")
    print("\nmodel attention from qkv (ms fwd | fwd+bwd)")
    for row in prologue:
        cells = "  ".join(f"{n} {r['fwd_ms']:.3f}|{r['fwd_bwd_ms']:.3f}" for n, r in row["impls"].items())
        print(f"{row['shape']:>11} {cells}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
