"""Benchmark: fused block ops vs the eager reference and torch.compile of it.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--full] [--dtypes float32,bfloat16]

For each op (norm+modulate, gated residual + norm+modulate, q/k norm +
rotary, SwiGLU, final LayerNorm+modulate), forward and forward+backward, at
DDT-B (C=768, 12 heads of 64) and DDT-XL (C=1152, 16 heads of 72) shapes,
with per-token modulation (the decoder's case; --per-sample adds the
encoder's per-sample case for the norm ops). Same inputs, same process.
The backward alone (`bwd_vs_eager`): on a CPU, timed around
`torch.autograd.backward` inside each forward+backward call of the rotation
(`*_bwd_s`, fastest call); on a GPU, (forward+backward) - forward.
On a GPU also reports achieved bandwidth against the device's HBM peak:
the bytes one forward must move (every input read once, every output written
once) over the time per call of 20 back-to-back calls that alternate between
two copies of the inputs, each larger than L2, so no call finds its inputs in
L2: once as back-to-back stream launches (`*_GBs`, which include the host's
launch cost when a call is shorter than it) and once replayed from a CUDA
graph (`*_graph_GBs`, GPU time alone). The same for the fused backward op of
the norm family and SwiGLU (`fused_bwd_*`), and for a plain device copy of the
same number of bytes (`copy_*`, the practical ceiling). On a CPU the same
copy is timed in the rotation with the forwards (`copy_s`, `copy_GBs`, and
`fused_fwd_pct_copy`, the fused forward's speed as % of it): a reference
point rather than a ceiling there, since a forward that mostly reads can move
more bytes per second than a copy. Also times a whole DDT-B/2 forward with the
fused backend against the reference backend. Writes
benchmarks/results/ops_<device>.json (or --out); a grid of other dtypes
(--dtypes float16) goes to ops_<device>_<dtypes>.json, a result of its own.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch._dynamo

from common import device_tag, machine_info, result_path, timed_interleaved, write_json

import ddt_fast  # noqa: E402
from ddt_fast import models, ops  # noqa: E402
from ddt_fast.ops import reference  # noqa: E402

HBM_PEAK_GBS = {"h100": 3350.0, "h200": 4800.0, "a100": 2039.0}
TARGETS = {"fwd_vs_eager": 3.0, "fwd_vs_compile": 1.5, "bwd_vs_eager": 2.0}  # CPU, ops 1 and 2


def make_case(op, B, L, C, dtype, device, per_sample=False):
    """(fused fn, reference fn, inputs, bytes moved by one forward). per_sample:
    shift/scale/gate are [B, 1, C] (the encoder's case) instead of [B, L, C]."""
    g = torch.Generator(device="cpu").manual_seed(0)
    Lm = 1 if per_sample else L  # rows of the modulation
    mod_bytes = 0 if per_sample else B * L * C * (torch.finfo(dtype).bits // 8)  # one [B, L, C] modulation operand
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    e = torch.finfo(dtype).bits // 8
    f = torch.ops.ddt_fast
    if op == "rms_norm_modulate":
        x, w = rnd(B, L, C), rnd(C)
        sh, sc, *_ = rnd(B, Lm, 6 * C).chunk(6, -1)
        return (
            lambda x, w, sh, sc: f.rms_norm_modulate(x, w, sh, sc, 1e-6),
            lambda x, w, sh, sc: reference.rms_norm_modulate(x, w, sh, sc, 1e-6),
            (x, w, sh, sc),
            2 * B * L * C * e + 2 * mod_bytes,
        )
    if op == "gated_residual_rms_norm_modulate":
        x, y, w = rnd(B, L, C), rnd(B, L, C), rnd(C)
        sh, sc, gate, *_ = rnd(B, Lm, 6 * C).chunk(6, -1)
        return (
            lambda x, gate, y, w, sh, sc: f.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
            lambda x, gate, y, w, sh, sc: reference.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
            (x, gate, y, w, sh, sc),
            4 * B * L * C * e + 3 * mod_bytes,
        )
    if op == "layer_norm_modulate":
        x = rnd(B, L, C)
        sh, sc = rnd(B, Lm, 2 * C).chunk(2, -1)
        return (
            lambda x, sh, sc: f.layer_norm_modulate(x, sh, sc, 1e-6),
            lambda x, sh, sc: reference.layer_norm_modulate(x, sh, sc, 1e-6),
            (x, sh, sc),
            2 * B * L * C * e + 2 * mod_bytes,
        )
    if op == "qk_norm_rope":
        D = 64 if C % 72 else 72
        H = C // D
        side = int(L**0.5)
        freqs = ops.rope_frequencies(side, L // side, D, torch.device(device))
        rope = torch.view_as_real(freqs).contiguous()
        qkv, qw, kw = rnd(B, L, 3 * C), rnd(D), rnd(D)
        return (
            lambda qkv, qw, kw: f.qk_norm_rope(qkv, qw, kw, H, rope, 1e-6),
            lambda qkv, qw, kw: reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6),
            (qkv, qw, kw),
            6 * B * L * C * e,
        )
    if op == "swiglu":
        hidden = int(2 * int(4 * C) / 3)
        a, b = rnd(B, L, hidden), rnd(B, L, hidden)
        return (lambda a, b: f.swiglu(a, b), reference.swiglu, (a, b), 3 * B * L * hidden * e)
    raise ValueError(op)


OPS = ["rms_norm_modulate", "gated_residual_rms_norm_modulate", "layer_norm_modulate", "qk_norm_rope", "swiglu"]
NORM_OPS = OPS[:3]  # the ops that take shift/scale (gate)


def fwd_bwd(fn, inputs, backward_times=None):
    """A forward and backward of fn on leaf copies of inputs. backward_times:
    a list that receives the wall time of each backward alone (CPU: the
    backward runs synchronously on the calling thread)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    grads = None

    def run():
        nonlocal grads
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if grads is None:
            grads = [torch.ones_like(o) for o in outs]
        t0 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        if backward_times is not None:
            backward_times.append(time.perf_counter() - t0)
        for t in leaves:
            t.grad = None

    return run


def bench_case(op, B, L, C, dtype, device, repeats, compile_ref, per_sample=False):
    fused, ref, inputs, nbytes = make_case(op, B, L, C, dtype, device, per_sample)
    cuda = device.type == "cuda"
    row = {"op": op, "B": B, "L": L, "C": C, "dtype": str(dtype).replace("torch.", "")}
    if op in NORM_OPS:
        row["modulation"] = "per_sample" if per_sample else "per_token"
    impls = {"fused": fused, "eager": ref}
    if compile_ref:
        impls["compile"] = torch.compile(ref, dynamic=False)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(*inputs)

        return run

    fwd_runs = {name: forward(fn) for name, fn in impls.items()}
    if not cuda:
        # The practical ceiling on a CPU: a copy moving the same bytes (half
        # read, half written), timed in the same rotation (same cache state).
        src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        fwd_runs["copy"] = lambda: dst.copy_(src)
    fwd = timed_interleaved(fwd_runs, repeats, warmup=3, cuda=cuda)
    # On a CPU each backward is also timed alone, inside the same rotation.
    bwd_times = {name: [] for name in impls}
    warmup = 3
    both = timed_interleaved(
        {name: fwd_bwd(fn, inputs, None if cuda else bwd_times[name]) for name, fn in impls.items()},
        max(5, repeats // 2),
        warmup=warmup,
        cuda=cuda,
    )
    # Ratios use each implementation's fastest run (see timed_interleaved).
    for name in impls:
        row[f"{name}_fwd_s"] = fwd[name]["min_s"]
        row[f"{name}_fwd_median_s"] = fwd[name]["median_s"]
        row[f"{name}_fwdbwd_s"] = both[name]["min_s"]
        row[f"{name}_fwdbwd_median_s"] = both[name]["median_s"]
    row["fwd_vs_eager"] = row["eager_fwd_s"] / row["fused_fwd_s"]
    row["fwdbwd_vs_eager"] = row["eager_fwdbwd_s"] / row["fused_fwdbwd_s"]
    if cuda:  # backward alone, as (fwd+bwd) - fwd
        row["bwd_vs_eager"] = (row["eager_fwdbwd_s"] - row["eager_fwd_s"]) / max(
            row["fused_fwdbwd_s"] - row["fused_fwd_s"], 1e-9
        )
    else:  # backward alone, timed around torch.autograd.backward (warm-up calls dropped)
        for name in impls:
            row[f"{name}_bwd_s"] = min(bwd_times[name][warmup:])
        row["bwd_vs_eager"] = row["eager_bwd_s"] / row["fused_bwd_s"]
    if compile_ref:
        row["fwd_vs_compile"] = row["compile_fwd_s"] / row["fused_fwd_s"]
        row["fwdbwd_vs_compile"] = row["compile_fwdbwd_s"] / row["fused_fwdbwd_s"]
    if not cuda:
        copy_s = fwd["copy"]["min_s"]
        row["copy_s"] = copy_s
        for name in impls:
            row[f"{name}_fwd_GBs"] = nbytes / row[f"{name}_fwd_s"] / 1e9
        row["copy_GBs"] = nbytes / copy_s / 1e9
        row["fused_fwd_pct_copy"] = 100 * copy_s / row["fused_fwd_s"]
    if cuda:
        peak = next((v for k, v in HBM_PEAK_GBS.items() if k in torch.cuda.get_device_name(device).lower()), None)
        copies = (inputs, tuple(t.clone() for t in inputs))
        for name, fn in impls.items():
            bandwidth_columns(row, f"{name}_fwd", nbytes, fn, copies, peak)
        bwd = backward_case(op, inputs, B, L, C, dtype, per_sample)
        if bwd is not None:
            bwd_fn, bwd_inputs, bwd_bytes = bwd
            bandwidth_columns(
                row, "fused_bwd", bwd_bytes, bwd_fn, (bwd_inputs, tuple(t.clone() for t in bwd_inputs)), peak
            )
        # the practical ceiling: a device-to-device copy moving the same bytes (half read, half written)
        src = [torch.empty(nbytes // 2, dtype=torch.uint8, device=device) for _ in range(2)]
        dst = torch.empty_like(src[0])
        bandwidth_columns(row, "copy", nbytes, lambda s: dst.copy_(s), ((src[0],), (src[1],)), peak)
        del src, dst
    return row


def backward_case(op, inputs, B, L, C, dtype, per_sample=False):
    """(fused backward op call, bytes it must move) for the ops whose backward
    is one ddt_fast op; None for the others. Per-token modulation: one more
    [B, L, C] read (scale) and write (grad_shift, grad_scale, grad_gate) each;
    per sample they are column sums (small outputs)."""
    e = torch.finfo(dtype).bits // 8
    f = torch.ops.ddt_fast
    n = B * L * C * e
    m = 0 if per_sample else n
    go = torch.randn(B, L, C, device=inputs[0].device, dtype=dtype)
    if op == "rms_norm_modulate":
        x, w, sh, sc = inputs
        # reads grad_out, x (scale); writes grad_x (grad_shift, grad_scale)
        return (
            lambda go, x, w, sh, sc: f.norm_modulate_backward(go, None, x, None, None, w, sh, sc, 1e-6, 1, False),
            (go, x, w, sh, sc),
            3 * n + 3 * m,
        )
    if op == "layer_norm_modulate":
        x, sh, sc = inputs
        return (
            lambda go, x, sh, sc: f.norm_modulate_backward(go, None, x, None, None, None, sh, sc, 1e-6, 2, False),
            (go, x, sh, sc),
            3 * n + 3 * m,
        )
    if op == "gated_residual_rms_norm_modulate":
        x, gate, y, w, sh, sc = inputs
        gxo = torch.randn_like(go)
        # reads grad_out, grad_x', x', y (gate, scale); writes grad_x, grad_y (grad_gate, grad_shift, grad_scale)
        return (
            lambda go, gxo, x, gate, y, w, sh, sc: f.norm_modulate_backward(
                go, gxo, x, gate, y, w, sh, sc, 1e-6, 1, True
            ),
            (go, gxo, x, gate, y, w, sh, sc),
            6 * n + 5 * m,
        )
    if op == "swiglu":
        a, b = inputs
        g = torch.randn_like(a)
        return (lambda g, a, b: f.swiglu_backward(g, a, b), (g, a, b), 5 * a.numel() * e)
    return None


def graph_seconds(fn, copies, calls=20):
    """Seconds per call of `calls` calls (alternating between the input copies)
    replayed from one CUDA graph: the GPU time alone, with no host launch
    cost between calls. None if the calls cannot be captured."""
    try:
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for inputs in copies:
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(calls):
                    fn(*copies[i % len(copies)])
            graph.replay()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3 / calls)
        del graph
        return best
    except Exception as e:  # a capture failure is a result (the stream timing still stands)
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]})")
        torch.cuda.synchronize()
        return None


def bandwidth_columns(row, prefix, nbytes, fn, copies, peak):
    """row[prefix_GBs] from back-to-back stream launches, row[prefix_graph_GBs]
    from a CUDA graph of the same calls, each with its % of the HBM peak."""
    for suffix, seconds in (("", back_to_back_seconds(fn, copies)), ("_graph", graph_seconds(fn, copies))):
        if seconds is None:
            continue
        row[f"{prefix}{suffix}_GBs"] = nbytes / seconds / 1e9
        if peak:
            row[f"{prefix}{suffix}_pct_peak"] = 100 * row[f"{prefix}{suffix}_GBs"] / peak


def back_to_back_seconds(fn, copies, calls=20):
    """Seconds per call of `calls` forward calls in one CUDA-event interval,
    alternating between the input copies (so L2 never holds a call's inputs)."""
    with torch.no_grad():
        for inputs in copies:
            fn(*inputs)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fn(*copies[i % len(copies)])
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def bench_model(device, dtype, repeats):
    torch.manual_seed(0)
    m = models.create("DDT-B/2").to(device=device)
    x = torch.randn(2, 4, 32, 32, device=device)
    t, y = torch.rand(2, device=device), torch.tensor([1, 2], device=device)

    def forward(backend):
        def run():
            with (
                torch.no_grad(),
                ops.use_backend(backend),
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                m(x, t, y)

        return run

    res = timed_interleaved(
        {b: forward(b) for b in ("reference", "fused")}, repeats, warmup=1, cuda=device.type == "cuda"
    )
    return {
        "model": "DDT-B/2",
        "batch": 2,
        "tokens": 256,
        "dtype": str(dtype).replace("torch.", ""),
        "reference_s": res["reference"]["min_s"],
        "fused_s": res["fused"]["min_s"],
        "reference_median_s": res["reference"]["median_s"],
        "fused_median_s": res["fused"]["median_s"],
        "speedup": res["reference"]["min_s"] / res["fused"]["min_s"],
    }


def _label(row):
    return row["op"] + (" (per sample)" if row.get("modulation") == "per_sample" else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one small shape per op, no torch.compile")
    p.add_argument("--full", action="store_true", help="the whole grid (B 4 and 32); slow on a CPU")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved forward repeats per implementation (default 30 on a CPU, 20 on a GPU, 5 with "
        "--quick); forward+backward takes half as many, at least 5",
    )
    p.add_argument(
        "--xl-only",
        action="store_true",
        help="DDT-XL shapes only (B 32, L 256 and 1024, C 1152, bf16), no torch.compile: a short GPU run",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="with --xl-only: also time torch.compile of the reference (compiles each op and shape)",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument(
        "--per-sample",
        action="store_true",
        help="also time the norm ops with per-sample shift/scale/gate ([B, 1, C], the encoder's case)",
    )
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated dtypes of the grid (float32, bfloat16, float16; default float32,bfloat16); "
        "the whole-model rows are timed for the float32 and bfloat16 among them",
    )
    p.add_argument("--out", default=None, help="output path (default benchmarks/results/ops_<device>.json)")
    args = p.parse_args(argv)
    chosen = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(chosen) - set(OPS))
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    dtype_names = [d for d in args.dtypes.split(",") if d]
    bad = sorted(set(dtype_names) - {"float32", "bfloat16", "float16"})
    if bad or not dtype_names:
        p.error(
            f"--dtypes: unknown dtype(s) {', '.join(bad) or '(none given)'}; choose from float32, bfloat16, float16"
        )
    dtypes = tuple(getattr(torch, d) for d in dtype_names)
    device = torch.device(args.device)
    machine = machine_info(device)  # before the runs: its load average shows competing work
    if not all(ddt_fast._extension.has_kernel(op, device.type.upper()) for op in OPS):
        sys.exit(f"the fused kernels are not built for {device.type}; run `make build` first")
    torch._dynamo.config.cache_size_limit = 256
    # (a CPU shared with other machines swings by +-15% between runs: more
    # repeats there, so the fastest of them is a steadier estimate)
    repeats = args.repeats or (5 if args.quick else 30 if device.type == "cpu" else 20)
    if args.quick:
        shapes = [(2, 256, 768, torch.float32)]
    elif args.xl_only:
        shapes = [(32, 256, 1152, torch.bfloat16), (32, 1024, 1152, torch.bfloat16)]
    else:
        batches = (4, 32) if args.full or device.type == "cuda" else (4,)
        shapes = list(itertools.product(batches, (256, 1024), (768, 1152), dtypes))
    # A fresh process runs its first few hundred milliseconds of kernels slowly
    # (thread pool start-up, first-touch page faults): run one case untimed first.
    bench_case(OPS[0], *shapes[0][:3], shapes[0][3], device, 3, compile_ref=False)
    rows = []
    header = (
        f"{'op':46s} {'B':>3s} {'L':>5s} {'C':>5s} {'dtype':>8s} {'fused ms':>9s} {'x eager':>8s} "
        f"{'x compile':>9s} {'bwd x eager':>11s}"
    )
    print(header)
    compile_ref = not (args.quick or args.xl_only) or (args.xl_only and args.compile)
    cases = [(shape, op, False) for shape, op in itertools.product(shapes, chosen)]
    if args.per_sample:
        cases += [(shape, op, True) for shape, op in itertools.product(shapes, chosen) if op in NORM_OPS]
    for (B, L, C, dtype), op, per_sample in cases:
        row = bench_case(op, B, L, C, dtype, device, repeats, compile_ref=compile_ref, per_sample=per_sample)
        rows.append(row)
        print(
            f"{_label(row):46s} {B:3d} {L:5d} {C:5d} {row['dtype']:>8s} {row['fused_fwd_s'] * 1e3:9.3f} "
            f"{row['fwd_vs_eager']:8.2f} {row.get('fwd_vs_compile', float('nan')):9.2f} "
            f"{row['bwd_vs_eager']:11.2f}",
            flush=True,
        )
    # On a CPU the fused ops are a small share of a forward (GEMMs dominate):
    # more interleaved repeats (~0.8 s a forward) to see past the machine's
    # noise. The reference backend's bf16 GEMMs are PyTorch's (5-7x slower
    # than float32 without bf16 matrix instructions, ~5 s a forward); ddt_fast
    # multiplies in float32 there (ops.linear).
    cpu_repeats = {torch.float32: 15, torch.bfloat16: 8}
    model_rows = [
        bench_model(device, dt, cpu_repeats[dt] if device.type == "cpu" else 20)
        for dt in (torch.float32, torch.bfloat16)
        if dt in dtypes
    ]
    for r in model_rows:
        print(
            f"whole {r['model']} forward ({r['dtype']}, B={r['batch']}, L={r['tokens']}): reference "
            f"{r['reference_s'] * 1e3:.1f} ms, fused {r['fused_s'] * 1e3:.1f} ms, x{r['speedup']:.2f}"
        )
    summary = {}
    if device.type == "cpu" and not args.quick:
        for op in ("rms_norm_modulate", "gated_residual_rms_norm_modulate"):
            mine = [r for r in rows if r["op"] == op and r["dtype"] in ("float32", "bfloat16")]  # the targets' dtypes
            if not mine:
                continue
            summary[op] = {k: min(r[k] for r in mine) for k in TARGETS}
            summary[op]["meets_targets"] = all(summary[op][k] >= v for k, v in TARGETS.items())
        print("worst-case ratios for ops 1 and 2 (targets", TARGETS, "):", summary)
        print("fwd GB/s: fused / compiled / copy of the same bytes (fused as % of copy):")
        for r in rows:
            print(
                f"{_label(r):46s} L={r['L']:5d} C={r['C']:5d} {r['dtype']:>8s} {r['fused_fwd_GBs']:.1f} / "
                f"{r.get('compile_fwd_GBs', float('nan')):.1f} / {r['copy_GBs']:.1f} "
                f"({r['fused_fwd_pct_copy']:.0f}%)"
            )
    if device.type == "cuda":
        print("GB/s (% of HBM peak), stream launches | CUDA graph:")
        for r in rows:
            cols = []
            for name in ("fused_fwd", "compile_fwd", "eager_fwd", "fused_bwd", "copy"):
                if f"{name}_GBs" not in r:
                    continue
                cell = f"{name} {r[f'{name}_GBs']:.0f}"
                if f"{name}_pct_peak" in r:
                    cell += f" ({r[f'{name}_pct_peak']:.0f}%)"
                if f"{name}_graph_GBs" in r:
                    cell += f" | {r[f'{name}_graph_GBs']:.0f}"
                    if f"{name}_graph_pct_peak" in r:
                        cell += f" ({r[f'{name}_graph_pct_peak']:.0f}%)"
                cols.append(cell)
            print(f"{_label(r):46s} L={r['L']:5d} " + "; ".join(cols))
    # another set of dtypes is another result (its own file and results table), not a newer one
    variant = "" if set(dtype_names) == {"float32", "bfloat16"} or args.quick or args.xl_only else "_".join(dtype_names)
    suffix = "_quick" if args.quick else "_xl" if args.xl_only else f"_{variant}" if variant else ""
    payload = {"machine": machine, "rows": rows, "model": model_rows, "cpu_targets": TARGETS, "summary": summary}
    if variant:
        payload["variant"] = variant
    path = write_json(args.out or result_path(f"ops_{device_tag(device)}{suffix}.json"), payload)
    print("wrote", path)


if __name__ == "__main__":
    main()
