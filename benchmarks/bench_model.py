"""Benchmark: the whole model and whole sampling runs against the published code path.

    python benchmarks/bench_model.py [--device cpu|cuda] [--quick] [--models DDT-B/2,...]
        [--batches 1,2,4] [--sample-model M] [--sample-batch B] [--steps N]
        [--no-compile | --compile] [--compile-timeout S] [--parts forward,sampling] [--out PATH]

Random-weight DDT presets, 256 px (32x32 latents, 256 tokens), same inputs
and same process for every implementation; times are the fastest of
interleaved repeats (ratios from them), medians are recorded too.

Baselines, each time:
  eager reference   the PyTorch reference of every op (`DDT_FAST_BACKEND=reference`, SDPA attention);
  compiled reference  `torch.compile` of that (default mode; for the forward benchmark one
                    compile with a dynamic batch size, --compile-static for one per batch
                    size; a failure or a compile longer than --compile-timeout is recorded
                    with its reason, not fatal);
  ddt_fast          the default dispatch (fused kernels where built and, on CUDA, GPU-verified);
                    on a GPU also `ddt_fast_fused` (every built kernel, our attention included)
                    when that differs.

1. Forward latency and throughput (images/s) of the full model `model(x, t, y)`
   and of the decoder-only step `model.decode(x, s)` (the step that reuses a
   shared self-condition `s`), plus the decoder with its modulations cached
   (what the fast sampler runs while `s` is reused). float32 and bfloat16
   weights on the CPU, bfloat16 on a GPU.
2. Sampling throughput (images/s) at the published ImageNet-256 settings
   (Euler, CFG 2.0 inside (0.3, 1.0), shift 1, last step 0.04)
   at a step count that fits the device (--steps; default 100 on a GPU, 10 on a CPU;
   the published runs use 250, which changes no per-step cost and hardly the ratios):
     published_eager     reference backend, reference mode (both CFG halves every
                         step), encoder every step: the published code path;
     published_compiled  the same through `torch.compile(model)`;
     fast_every_step     ddt_fast fast mode, encoder every step (same numbers as the
                         published path inside the guidance interval);
     fast_dp_<r>         fast mode with the calibrated DP schedule at sharing ratio
                         r = 0.5, 0.8, 0.87 (K = round(N (1 - r)) encoder steps);
     *_cuda_graph        (GPU) the same with each step's model calls replayed from CUDA graphs.
   On a GPU the model is in bf16 and the loop runs under bf16 autocast.
3. Training step throughput: summarised from the training benchmark's JSON
   (benchmarks/results/train_<device>.json or training_<device>.json) when it exists.

FLOPs (GPU: achieved TFLOP/s and model FLOP utilisation, MFU = achieved /
peak dense bf16). Counted analytically as 2 x multiply-adds of the matrix
products (elementwise work is not counted), for B images of L tokens,
hidden C, SwiGLU hidden F = int(2 int(4C) / 3), patch features P = Cin p^2,
E encoder and D decoder blocks:
  block, per token:        4 C^2 (qkv, out proj) + 3 C F (SwiGLU) + 2 L C (QK^T, AV)
  decoder modulation:      6 C^2 per token per decoder block (Linear(C, 6C) of the
                           per-token s: a GEMM of L x C x 6C per block)
  encoder modulation:      6 C^2 per image per encoder block
  final layer, per token:  2 C^2 (per-token modulation) + C P (projection)
  embeddings:              C P per token (x; and s for the encoder), 256 C + C^2 per image (t)
  forward = B [L (2 C P + (E + D) block + D 6 C^2 + 2 C^2 + C P) + E 6 C^2 + 256 C + C^2]
  decode  = B L (C P + D block + D 6 C^2 + 2 C^2 + C P)     (cached modulations: minus D 6 C^2 + 2 C^2)
The device peak comes from a table of published dense bf16 peaks keyed by the
device name (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, A100 312, ...); a
large bf16 matmul is timed too and MFU is reported against both.

Writes benchmarks/results/model_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import sys
import time
import traceback

import torch

from bench_sampling import work_counts
from common import RESULTS, device_tag, machine_info, random_model, result_path, timed, timed_interleaved, write_json

from ddt_fast import ops, sampling  # noqa: E402
from ddt_fast.models.ddt import ModulationCache  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = [
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.4),
    ("gh200", 989.4),
    ("h200", 989.4),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.1),
    ("a10g", 70.0),
    ("l4", 121.0),
]
RATIOS = (0.5, 0.8, 0.87)
SETTINGS = dict(
    guidance=2.0, timeshift=1.0, guidance_interval_min=0.3, guidance_interval_max=1.0, last_step=0.04
)  # the published ImageNet-256 settings (sampling-and-sharing spec)
LATENT = 32
TARGETS_GPU = {
    "fast_every_step_vs_published_eager": 1.5,
    "fast_every_step_vs_published_compiled": 1.2,
    "fast_dp_0.8_vs_published_eager": 4.0,
    "forward_mfu": 0.60,
}


# -- FLOPs -----------------------------------------------------------------------


def flop_counts(model, batch: int, tokens: int) -> dict:
    """FLOPs (2 x multiply-adds, see the module docstring) of a forward, a decode
    and a decode with cached modulations, for `batch` images of `tokens` tokens."""
    C, L = model.hidden_size, tokens
    E, D = model.num_encoder_blocks, model.num_blocks - model.num_encoder_blocks
    F = int(2 * int(4 * C) / 3)
    P = model.in_channels * model.patch_size**2
    block = 4 * C * C + 3 * C * F + 2 * L * C
    dec_mod, final_mod = 6 * C * C, 2 * C * C
    per_image_cond = E * 6 * C * C + 256 * C + C * C
    forward = L * (2 * C * P + (E + D) * block + D * dec_mod + final_mod + C * P) + per_image_cond
    decode = L * (C * P + D * block + D * dec_mod + final_mod + C * P)
    decode_cached = decode - L * (D * dec_mod + final_mod)
    return {
        k: 2.0 * batch * v
        for k, v in (("forward", forward), ("decode", decode), ("decode_cached_modulation", decode_cached))
    }


def sampling_flops(model, sampler, batch: int, tokens: int) -> float:
    """FLOPs of one sampling run: encoder, decoder and decoder-modulation runs
    counted per half-batch as the sampler makes them."""
    f = flop_counts(model, batch, tokens)
    enc = f["forward"] - f["decode"]
    mod = f["decode"] - f["decode_cached_modulation"]
    if sampler.mode == "reference":
        return 2 * sampler.num_steps * f["forward"]
    w = work_counts(sampler)
    return w["encoder"] * enc + w["decoder"] * f["decode_cached_modulation"] + w["decoder_modulation"] * mod


def device_peak(device) -> dict:
    """Published dense bf16 peak for the device name, and a timed 8192^3 bf16 matmul."""
    name = torch.cuda.get_device_name(device)
    table = next((v for k, v in PEAK_BF16_TFLOPS if k in name.lower()), None)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    r = timed(lambda: a @ b, repeats=20, warmup=5, cuda=True)
    return {"device": name, "table_bf16_tflops": table, "matmul_bf16_tflops": 2 * n**3 / r["min_s"] / 1e12}


# -- torch.compile with a time limit --------------------------------------------------


class CompileTimeout(BaseException):
    """Raised by the alarm (a BaseException, so compiler code that catches Exception lets it through)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise CompileTimeout(f"compiling took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    # after the deadline the alarm repeats: code that swallows one exception gets another
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_compiled_call(run, timeout_s: float, sync):
    """Run a compiled function's first call for these shapes (where it compiles)
    within `timeout_s`: (True, seconds) or (False, why it was given up)."""
    t0 = time.perf_counter()
    try:
        with time_limit(timeout_s), reference_backend(), torch.no_grad():
            run()
            sync()
    except CompileTimeout as e:
        return False, str(e)
    except Exception as e:  # a compiler failure is a result, not a crash
        return False, f"torch.compile failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return True, time.perf_counter() - t0


def reference_backend():
    return ops.use_backend("reference", attention="sdpa")


def ddt_fast_backend():
    return ops.use_backend("auto", attention="auto")


def fused_backend():
    return ops.use_backend("fused", attention="ddt")


def _in(ctx_factory, fn):
    def run():
        with torch.no_grad(), ctx_factory():
            return fn()

    return run


# -- 1. forward -------------------------------------------------------------------------


def bench_forward(
    name, device, dtype, batches, repeats, compile_timeout, with_fused, compile_static, no_compile_reason="--no-compile"
):
    """Rows for the full forward and the decoder-only step at each batch size."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = random_model(name, device, dtype)
    tokens = (LATENT // model.patch_size) ** 2
    rows = []
    # compiled once per part with a dynamic batch size (static: once per batch size)
    compiled = {"forward": None, "decode": None}
    if compile_timeout is not None:
        compiled = {
            "forward": torch.compile(model, dynamic=not compile_static),
            "decode": torch.compile(model.decode, dynamic=not compile_static),
        }
    compile_info = {
        part: ({"compile_s_by_batch": {}} if c is not None else {"skipped": no_compile_reason})
        for part, c in compiled.items()
    }
    for B in batches:
        x = torch.randn(B, model.in_channels, LATENT, LATENT, device=device, dtype=dtype)
        t = torch.rand(B, device=device)
        y = torch.randint(0, model.num_classes, (B,), device=device)
        with torch.no_grad():
            s = model.encode(x, t, y)
            cache = ModulationCache().fill(model, s)
        calls = {"forward": (lambda f: f(x, t, y), model), "decode": (lambda f: f(x, s), model.decode)}
        flops = flop_counts(model, B, tokens)
        for part, (call, fn) in calls.items():
            cfn = compiled[part]
            if cfn is not None:
                ok, value = first_compiled_call(lambda: call(cfn), compile_timeout, sync)
                if ok:
                    compile_info[part]["compile_s_by_batch"][B] = value
                else:  # given up for this part: later batches go without the compiled baseline
                    compiled[part], cfn = None, None
                    compile_info[part] = {"skipped": f"batch {B}: {value}"}
                    print(f"  torch.compile of the reference {part}: {compile_info[part]['skipped']}")
            impls = {
                "reference_eager": _in(reference_backend, lambda: call(fn)),
                "ddt_fast": _in(ddt_fast_backend, lambda: call(fn)),
            }
            if cfn is not None:
                impls["reference_compiled"] = _in(reference_backend, lambda: call(cfn))
            if with_fused:
                impls["ddt_fast_fused"] = _in(fused_backend, lambda: call(fn))
            if part == "decode":
                impls["ddt_fast_cached_modulation"] = _in(ddt_fast_backend, lambda: model.decode(x, s, cache))  # noqa: F821 (del'd after use)
            res = timed_interleaved(impls, repeats, warmup=1, cuda=cuda)
            row = {
                "model": name,
                "part": part,
                "dtype": str(dtype).replace("torch.", ""),
                "batch": B,
                "tokens": tokens,
                "flops": flops[part],
                "compile": dict(compile_info[part]),
                "impls": {},
            }
            base = res["reference_eager"]["min_s"]
            for k, r in res.items():
                f = flops["decode_cached_modulation"] if k == "ddt_fast_cached_modulation" else flops[part]
                row["impls"][k] = {
                    "seconds": r["min_s"],
                    "median_s": r["median_s"],
                    "images_per_s": B / r["min_s"],
                    "speedup_vs_reference_eager": base / r["min_s"],
                    "tflops": f / r["min_s"] / 1e12,
                }
            if "reference_compiled" in res:
                row["ddt_fast_vs_reference_compiled"] = res["reference_compiled"]["min_s"] / res["ddt_fast"]["min_s"]
            rows.append(row)
            print(
                f"  {name} {part:7s} {row['dtype']:8s} B={B:<4d}"
                + "".join(
                    f" {k} {r['seconds'] * 1e3:9.2f} ms (x{r['speedup_vs_reference_eager']:.2f})"
                    for k, r in row["impls"].items()
                ),
                flush=True,
            )
    del model, compiled
    torch._dynamo.reset()
    return rows


# -- 2. sampling ----------------------------------------------------------------------------


def bench_sampling(name, device, batch, steps, repeats, compile_timeout):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    bf16 = cuda
    model = random_model(name, device, torch.bfloat16 if bf16 else torch.float32)
    tokens = (LATENT // model.patch_size) ** 2
    settings = dict(SETTINGS, num_steps=steps, autocast=torch.bfloat16 if bf16 else None)
    t0 = time.perf_counter()
    calib = sampling.calibrate(
        model, sampling.EulerSampler(**settings), num_samples=8 if cuda else 2, latent_size=LATENT
    )
    calib_s = time.perf_counter() - t0
    samplers = {
        "published_eager": sampling.EulerSampler(**settings, mode="reference"),
        "fast_every_step": sampling.EulerSampler(**settings, mode="fast"),
    }
    dp = {}
    for r in RATIOS:
        sched = calib.schedule_for_ratio(r)
        dp[f"fast_dp_{r}"] = {"ratio": r, "budget": sched.budget, "cost": sched.cost, "steps": list(sched.steps)}
        samplers[f"fast_dp_{r}"] = sampling.EulerSampler(**settings, mode="fast", schedule=sched)
    if cuda:
        for k in ("fast_every_step", "fast_dp_0.8"):
            samplers[f"{k}_cuda_graph"] = sampling.EulerSampler(
                **settings, mode="fast", cuda_graph=True, schedule=samplers[k].schedule
            )
    classes = torch.arange(batch, device=device) % model.num_classes
    noise = sampling.make_noise(range(batch), (model.in_channels, LATENT, LATENT), device)
    null = torch.full_like(classes, model.num_classes)
    runs = {
        k: _in(
            reference_backend if k.startswith("published") else ddt_fast_backend,
            lambda s=s: s(model, noise, classes, null),  # noqa: F821 (del'd after use)
        )
        for k, s in samplers.items()
    }
    compile_info = {"skipped": "--no-compile"}
    if compile_timeout is not None:
        ref, compiled = samplers["published_eager"], torch.compile(model)
        ok, value = first_compiled_call(lambda: ref(compiled, noise, classes, null), compile_timeout, sync)
        compile_info = {"compile_s": value} if ok else {"skipped": value}
        if ok:
            runs["published_compiled"] = _in(reference_backend, lambda: ref(compiled, noise, classes, null))
            samplers["published_compiled"] = ref
        else:
            print(f"  torch.compile of the published path: {value}")
    res = timed_interleaved(runs, repeats, warmup=1, cuda=cuda)
    base = res["published_eager"]["min_s"]
    rows = {}
    for k, r in res.items():
        f = sampling_flops(model, samplers[k], batch, tokens)
        rows[k] = {
            "seconds": r["min_s"],
            "median_s": r["median_s"],
            "images_per_s": batch / r["min_s"],
            "speedup_vs_published_eager": base / r["min_s"],
            "flops": f,
            "tflops": f / r["min_s"] / 1e12,
            "flop_ceiling_vs_published": sampling_flops(model, samplers["published_eager"], batch, tokens) / f,
        }
        if "published_compiled" in res:
            rows[k]["speedup_vs_published_compiled"] = res["published_compiled"]["min_s"] / r["min_s"]
        print(
            f"  {k:28s} {r['min_s']:9.3f} s {batch / r['min_s']:9.3f} img/s  x{base / r['min_s']:.2f} "
            f"(FLOP ceiling x{rows[k]['flop_ceiling_vs_published']:.2f})",
            flush=True,
        )
    out = {
        "model": name,
        "batch": batch,
        "steps": steps,
        "tokens": tokens,
        "dtype": "bfloat16 (weights and autocast)" if bf16 else "float32",
        "guided_steps": sum(samplers["fast_every_step"].is_guided(i) for i in range(steps)),
        "settings": {k: v for k, v in SETTINGS.items()},
        "compile": compile_info,
        "calibration_s": calib_s,
        "dp": dp,
        "dp_curve": [[int(k), float(c)] for k, c in calib.curve()],
        "results": rows,
    }
    del model
    torch._dynamo.reset()
    return out


# -- 3. training (another benchmark's JSON) ------------------------------------------------


def training_summary(tag: str):
    """The training benchmark's result for this device, if one has been written."""
    paths = [
        p for name in (f"train_{tag}.json", f"training_{tag}.json") for p in glob.glob(os.path.join(RESULTS, name))
    ]
    if not paths:
        return None
    with open(paths[0]) as f:
        d = json.load(f)
    return {
        "source": os.path.relpath(paths[0], os.path.dirname(RESULTS)),
        "machine": d.get("machine"),
        "results": d.get("results", {k: v for k, v in d.items() if k != "machine"}),
    }


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: small model, few steps, no torch.compile")
    p.add_argument("--models", default=None, help="comma-separated presets for the forward benchmark")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes for the forward benchmark")
    p.add_argument(
        "--bf16-batches",
        default=None,
        help="CPU: batch sizes for the bf16 forward (slow on a CPU; no compiled baseline unless --compile)",
    )
    p.add_argument("--sample-model", default=None)
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (published: 250)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--parts", default="forward,sampling", help="forward, sampling (comma-separated)")
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile of the reference (default: on, except --quick and the CPU's bf16 forward)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--compile-static",
        action="store_true",
        help="compile the forward benchmark per batch size (default: once, dynamic batch size)",
    )
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help="seconds a compile may take before that baseline is skipped (default 600, quick 120)",
    )
    p.add_argument("--out", default=None, help="output path (default benchmarks/results/model_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 1
    machine = machine_info(device)
    q = args.quick
    if cuda:
        d = dict(
            models="DDT-B/2" if q else "DDT-B/2,DDT-L/2,DDT-XL/2",
            batches="16,64" if q else "16,64,128",
            bf16="",
            sample_model="DDT-B/2" if q else "DDT-XL/2",
            sample_batch=16 if q else 64,
            steps=20 if q else 100,
            repeats=2,
        )
    else:
        d = dict(
            models="DDT-tiny/2" if q else "DDT-B/2",
            batches="1,2" if q else "2,4",
            bf16="1" if q else "2",
            sample_model="DDT-tiny/2" if q else "DDT-B/2",
            sample_batch=2,
            steps=4 if q else 10,
            repeats=1 if q else 2,
        )
    use_compile = args.compile if args.compile is not None else not q
    compile_timeout = (args.compile_timeout or (120.0 if q else 600.0)) if use_compile else None
    repeats = args.repeats or d["repeats"]
    parts = set(args.parts.split(","))
    torch._dynamo.config.cache_size_limit = 64
    out = {
        "machine": machine,
        "quick": q,
        "repeats": repeats,
        "plan": ops.plan(device),
        "flop_formula": "see the docstring of benchmarks/bench_model.py",
        "targets_gpu": TARGETS_GPU,
    }
    if cuda:
        out["peak"] = device_peak(device)
        with fused_backend():
            fused_plan = ops.plan(device)
        out["plan_fused"] = fused_plan
        print(
            f"peak bf16: table {out['peak']['table_bf16_tflops']} TFLOP/s, "
            f"matmul {out['peak']['matmul_bf16_tflops']:.0f} TFLOP/s"
        )
    if "forward" in parts:
        print("forward (min over interleaved repeats; x = speed-up vs the eager reference):")
        rows = []
        for name in (args.models or d["models"]).split(","):
            dtypes = (
                [(torch.bfloat16, _ints(args.batches or d["batches"]))]
                if cuda
                else [
                    (torch.float32, _ints(args.batches or d["batches"])),
                    (torch.bfloat16, _ints(args.bf16_batches if args.bf16_batches is not None else d["bf16"])),
                ]
            )
            for dtype, batches in dtypes:
                if batches:
                    # on a CPU the compiled baseline of the forward is timed in float32 only (compile time)
                    cpu_bf16 = not cuda and dtype != torch.float32 and not args.compile
                    rows += bench_forward(
                        name,
                        device,
                        dtype,
                        batches,
                        repeats,
                        None if cpu_bf16 else compile_timeout,
                        with_fused=cuda and out.get("plan_fused") != out["plan"],
                        compile_static=args.compile_static,
                        no_compile_reason="not timed for bf16 on a CPU by default (compile time; --compile times it)"
                        if cpu_bf16 and use_compile
                        else "--no-compile",
                    )
        if cuda:
            for row in rows:
                for r in row["impls"].values():
                    r["mfu_table_peak"] = (
                        r["tflops"] / out["peak"]["table_bf16_tflops"] if out["peak"]["table_bf16_tflops"] else None
                    )
                    r["mfu_matmul_peak"] = r["tflops"] / out["peak"]["matmul_bf16_tflops"]
        out["forward"] = rows
    if "sampling" in parts:
        name, batch, steps = (
            args.sample_model or d["sample_model"],
            args.sample_batch or d["sample_batch"],
            args.steps or d["steps"],
        )
        print(f"sampling {name}, batch {batch}, {steps} Euler steps, CFG 2.0 in (0.3, 1.0):")
        try:
            out["sampling"] = bench_sampling(name, device, batch, steps, repeats, compile_timeout)
        except torch.cuda.OutOfMemoryError as e:
            out["sampling"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            traceback.print_exc()
    train = training_summary(device_tag(device))
    if train is not None:
        out["training"] = train
        print("training benchmark:", train["source"])
    path = write_json(args.out or result_path(f"model_{device_tag(device)}{'_quick' if q else ''}.json"), out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
