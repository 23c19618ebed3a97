"""Benchmark: sampling throughput, published code path vs ddt_fast's fast mode
and DP encoder sharing.

    python benchmarks/bench_sampling.py [--model DDT-B/2] [--steps 10] [--batch 2] [--quick]

A randomly initialised model of the given size, the published ImageNet-256
settings (Euler, CFG 2.0 in (0.3, 1.0), last step 0.04) at a step count that
fits the machine, 32x32 latents. Images/s of
  (a) reference mode, encoder every step (the published code path);
  (b) fast mode, encoder every step;
  (c) fast mode with the calibrated DP schedule at sharing ratio 0.8 (K = N/5);
plus the DP cost at that budget and the multiply-add ceilings of (b) and (c)
counted from the runs fast mode actually makes (see `work_counts`). On a GPU
also (b) and (c) with `cuda_graph=True` (each step's model calls replayed
from CUDA graphs), and the model in bf16 with bf16 autocast by default.
Writes benchmarks/results/sampling_<device>.json (or --out).
"""

from __future__ import annotations

import argparse

import torch

from common import device_tag, machine_info, random_model, result_path, timed_interleaved, write_json

from ddt_fast import sampling  # noqa: E402


def work_counts(sampler) -> dict:
    """Encoder, decoder and decoder-modulation half-batch runs of fast mode,
    replaying its rules (sampling/samplers.py) over the sampler's schedule."""
    enc = dec = mod = 0
    s_u = cfg = False
    cached = set()
    for i in range(sampler.num_steps):
        both = sampler.is_guided(i) and sampler.guidance != 1.0
        if sampler.schedule.recompute(i):
            enc += 2 if both else 1
            s_u = cfg = both
            cached = set()
        elif both and not cfg:
            enc += 0 if s_u else 1
            s_u = cfg = True
        key = "cfg" if both else "c"
        if key not in cached:
            mod += 2 if both else 1
            cached.add(key)
        dec += 2 if both else 1
    return {"encoder": enc, "decoder": dec, "decoder_modulation": mod}


def flop_ceilings(model, tokens: int, samplers: dict) -> dict:
    """Multiply-adds per token and the speed-up ceilings of (b) and (c) over (a)
    (per token: encoder block 12 C^2 + attention; decoder block 12 C^2 +
    attention + 6 C^2 for its per-token modulation; final layer 2 C^2)."""
    C, E, Dn = model.hidden_size, model.num_encoder_blocks, model.num_blocks - model.num_encoder_blocks
    hidden = int(2 * int(4 * C) / 3)
    block = 4 * C * C + 3 * C * hidden + 2 * tokens * C  # qkv + proj, SwiGLU, QK^T and AV
    enc = E * block
    dec = Dn * block
    mod = Dn * 6 * C * C + 2 * C * C
    cost = {}
    for name, s in samplers.items():
        if s.mode == "reference":
            n = 2 * s.num_steps
            cost[name] = n * (enc + dec + mod)
        else:
            w = work_counts(s)
            cost[name] = w["encoder"] * enc + w["decoder"] * dec + w["decoder_modulation"] * mod
    base = cost["a_reference_every_step"]
    return {f"ceiling_{k[0]}": base / v for k, v in cost.items() if not k.startswith("a_")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DDT-B/2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--autocast",
        choices=["auto", "none", "bf16"],
        default="auto",
        help="bf16: model in bf16 and the loop under bf16 autocast (auto: bf16 on a GPU)",
    )
    p.add_argument("--quick", action="store_true", help="DDT-tiny, a smoke run")
    p.add_argument("--out", default=None, help="output path (default benchmarks/results/sampling_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = machine_info(device)
    name = "DDT-tiny/2" if args.quick else args.model
    bf16 = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    model = random_model(name, device, torch.bfloat16 if bf16 else torch.float32)
    N = args.steps
    settings = dict(
        num_steps=N,
        guidance=2.0,
        timeshift=1.0,
        guidance_interval_min=0.3,
        guidance_interval_max=1.0,
        last_step=0.04,
        autocast=torch.bfloat16 if bf16 else None,
    )
    calib = sampling.calibrate(model, sampling.EulerSampler(**settings), num_samples=2, latent_size=32)
    budget = max(1, round(N / 5))
    dp_schedule = calib.schedule(budget)
    samplers = {
        "a_reference_every_step": sampling.EulerSampler(**settings, mode="reference"),
        "b_fast_every_step": sampling.EulerSampler(**settings, mode="fast"),
        "c_fast_dp_ratio_0.8": sampling.EulerSampler(**settings, mode="fast", schedule=dp_schedule),
    }
    ceil = flop_ceilings(model, 256, samplers)
    if device.type == "cuda":
        for k in ("b_fast_every_step", "c_fast_dp_ratio_0.8"):
            s = samplers[k]
            samplers[f"{k}_cuda_graph"] = sampling.EulerSampler(
                **settings, mode="fast", schedule=s.schedule, cuda_graph=True
            )
    classes = torch.arange(args.batch, device=device) % model.num_classes
    noise = sampling.make_noise(range(args.batch), (model.in_channels, 32, 32), device)
    null = torch.full_like(classes, model.num_classes)
    res = timed_interleaved(
        {k: (lambda s=s: s(model, noise, classes, null)) for k, s in samplers.items()},
        args.repeats,
        warmup=1,
        cuda=device.type == "cuda",
    )
    guided_steps = sum(samplers["b_fast_every_step"].is_guided(i) for i in range(N))
    rows = {}
    base = res["a_reference_every_step"]["min_s"]
    for k, r in res.items():
        rows[k] = {
            "seconds": r["min_s"],
            "median_s": r["median_s"],
            "images_per_s": args.batch / r["min_s"],
            "speedup_vs_a": base / r["min_s"],
        }
    print(
        f"{name}, {N} steps, batch {args.batch}, {device}: guided steps {guided_steps}/{N}, "
        f"DP budget {budget} (cost {dp_schedule.cost:.4f}, steps {list(dp_schedule.steps)})"
    )
    for k, r in rows.items():
        print(f"  {k:26s} {r['seconds']:8.2f} s  {r['images_per_s']:7.3f} img/s  x{r['speedup_vs_a']:.2f}")
    graph_vs_eager = {
        k: rows[k]["speedup_vs_a"] / rows[k[: -len("_cuda_graph")]]["speedup_vs_a"]
        for k in rows
        if k.endswith("_cuda_graph")
    }
    for k, r in graph_vs_eager.items():
        print(f"  {k}: x{r:.2f} vs the same run without CUDA graphs")
    print(f"  multiply-add ceilings: (b) x{ceil['ceiling_b']:.2f}, (c) x{ceil['ceiling_c']:.2f}")
    path = write_json(
        args.out or result_path(f"sampling_{device_tag(device)}{'_quick' if args.quick else ''}.json"),
        {
            "machine": machine,
            "model": name,
            "steps": N,
            "batch": args.batch,
            "guided_steps": guided_steps,
            "dtype": "bfloat16 (autocast)" if bf16 else "float32",
            "graph_vs_eager": graph_vs_eager,
            "dp": {"budget": budget, "cost": dp_schedule.cost, "steps": list(dp_schedule.steps)},
            "results": rows,
            "ceilings": ceil,
            "targets": {"b_vs_a": 1.15, "c_vs_a": 2.5},
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
