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
(per token: encoder block 12 C^2 + attention, decoder block 18 C^2 since its
modulation Linear(C, 6C) runs per token, the final layer 2 C^2 per token).
Writes benchmarks/results/sampling_<device>.json.
"""
from __future__ import annotations

import argparse

import torch

from common import device_tag, machine_info, result_path, timed_interleaved, write_json

from ddt_fast import models, sampling  # noqa: E402


def flop_ceilings(model, tokens: int, steps: int, guided_steps: int, budget: int) -> dict:
    """Multiply-adds per sample per step, and the speed-up ceilings of (b) and (c)."""
    C, E, Dn = model.hidden_size, model.num_encoder_blocks, model.num_blocks - model.num_encoder_blocks
    hidden = int(2 * int(4 * C) / 3)
    attn = 2 * tokens * C  # QK^T and AV per token
    block_common = 4 * C * C + 3 * C * hidden + attn  # qkv, proj, SwiGLU
    enc = E * (block_common + 6 * C * C / tokens)  # per-sample modulation, spread over the tokens
    dec = Dn * (block_common + 6 * C * C) + 2 * C * C  # per-token modulation, final layer modulation
    ref = steps * 2 * (enc + dec)  # both halves, every step
    fast = guided_steps * 2 * (enc + dec) + (steps - guided_steps) * (enc + dec)
    # (c): the decoder every step (both halves when guided), the encoder K times,
    # the decoder's modulations only when s changes
    dec_no_mod = dec - Dn * 6 * C * C - 2 * C * C
    shared = (guided_steps * 2 + (steps - guided_steps)) * dec_no_mod + budget * 2 * (enc + Dn * 6 * C * C + 2 * C * C)
    return {"ceiling_b": ref / fast, "ceiling_c": ref / shared}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DDT-B/2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="DDT-tiny, a smoke run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = machine_info(device)
    name = "DDT-tiny/2" if args.quick else args.model
    torch.manual_seed(0)
    model = models.create(name).to(device).eval()
    with torch.no_grad():  # a random model, but not the zero-initialised final layer
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    N = args.steps
    settings = dict(num_steps=N, guidance=2.0, timeshift=1.0, guidance_interval_min=0.3,
                    guidance_interval_max=1.0, last_step=0.04)
    calib = sampling.calibrate(model, sampling.EulerSampler(**settings), num_samples=2, latent_size=32)
    budget = max(1, round(N / 5))
    dp_schedule = calib.schedule(budget)
    samplers = {
        "a_reference_every_step": sampling.EulerSampler(**settings, mode="reference"),
        "b_fast_every_step": sampling.EulerSampler(**settings, mode="fast"),
        "c_fast_dp_ratio_0.8": sampling.EulerSampler(**settings, mode="fast", schedule=dp_schedule),
    }
    classes = torch.arange(args.batch, device=device) % model.num_classes
    noise = sampling.make_noise(range(args.batch), (model.in_channels, 32, 32), device)
    null = torch.full_like(classes, model.num_classes)
    res = timed_interleaved({k: (lambda s=s: s(model, noise, classes, null)) for k, s in samplers.items()},
                            args.repeats, warmup=1, cuda=device.type == "cuda")
    guided_steps = sum(samplers["b_fast_every_step"].is_guided(i) for i in range(N))
    ceil = flop_ceilings(model, 256, N, guided_steps, budget)
    rows = {}
    base = res["a_reference_every_step"]["min_s"]
    for k, r in res.items():
        rows[k] = {"seconds": r["min_s"], "median_s": r["median_s"], "images_per_s": args.batch / r["min_s"],
                   "speedup_vs_a": base / r["min_s"]}
    print(f"{name}, {N} steps, batch {args.batch}, {device}: guided steps {guided_steps}/{N}, "
          f"DP budget {budget} (cost {dp_schedule.cost:.4f}, steps {list(dp_schedule.steps)})")
    for k, r in rows.items():
        print(f"  {k:26s} {r['seconds']:8.2f} s  {r['images_per_s']:7.3f} img/s  x{r['speedup_vs_a']:.2f}")
    print(f"  multiply-add ceilings: (b) x{ceil['ceiling_b']:.2f}, (c) x{ceil['ceiling_c']:.2f}")
    path = write_json(result_path(f"sampling_{device_tag(device)}{'_quick' if args.quick else ''}.json"), {
        "machine": machine, "model": name, "steps": N, "batch": args.batch, "guided_steps": guided_steps,
        "dp": {"budget": budget, "cost": dp_schedule.cost, "steps": list(dp_schedule.steps)},
        "results": rows, "ceilings": ceil, "targets": {"b_vs_a": 1.15, "c_vs_a": 2.5}})
    print("wrote", path)


if __name__ == "__main__":
    main()
