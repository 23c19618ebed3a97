"""Benchmark: training-step throughput (forward, backward, AdamW, EMA).

    python benchmarks/bench_training.py [--model DDT-B/2] [--batch 2] [--latent 32] [--precision fp32|bf16]
        [--compile | --no-compile] [--quick]

One `Trainer.train_step` of a randomly initialised model on random latents
(32x32 latents: 256 tokens at patch 2), same process, same batch, timed in
rotation:
  (a) reference backend (`DDT_FAST_BACKEND=reference`: eager PyTorch ops);
  (b) ddt_fast's fused ops (the default backend);
  (c) `torch.compile` of the reference backend (default on a GPU; --compile on the CPU).
Writes benchmarks/results/training_<device>.json (`--precision bf16`:
training_<device>_bf16.json, a result of its own). With bf16 autocast on a CPU
without bf16 matrix instructions, (b) also multiplies in float32 (ops.linear)
where the reference runs PyTorch's bf16 kernels.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import device_tag, machine_info, result_path, timed_interleaved, write_json

from ddt_fast import ops  # noqa: E402
from ddt_fast.models import preset_config  # noqa: E402
from ddt_fast.training import TrainConfig, Trainer  # noqa: E402


class RandomLatents(torch.utils.data.Dataset):
    def __init__(self, n, shape, num_classes):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn((n, *shape), generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make_trainer(args, device, out_dir, compile_):
    cfg = TrainConfig(
        model=args.model,
        global_batch=args.batch,
        steps=10**9,
        ckpt_every=10**9,
        out_dir=out_dir,
        precision=args.precision,
        compile=compile_,
        device=str(device),
        progress=False,
        tensorboard=False,
    )
    data = RandomLatents(args.batch, (4, args.latent, args.latent), preset_config(args.model)["num_classes"])
    trainer = Trainer(cfg, dataset=data)
    batch = {k: torch.stack([data[i][k] for i in range(args.batch)]) for k in ("x", "y")}
    return trainer, batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DDT-B/2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time (c) (default on a GPU; on the CPU compiling takes minutes, so off unless asked)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="DDT-tiny, a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.latent = "DDT-tiny/2", 8
    device = torch.device(args.device)
    machine = machine_info(device)
    cuda = device.type == "cuda"

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("a_reference", "reference", False), ("b_fused", "auto", False)]
        if args.compile if args.compile is not None else cuda:
            variants.append(("c_compiled_reference", "reference", True))
        compile_s = None
        for name, backend, compile_ in variants:
            trainer, batch = make_trainer(args, device, f"{tmp}/{name}", compile_)

            def step(trainer=trainer, batch=batch, backend=backend):
                with ops.use_backend(backend):
                    trainer.train_step([batch])

            if compile_:
                t0 = time.perf_counter()
                step()
                compile_s = time.perf_counter() - t0
            runs[name] = step
        res = timed_interleaved(runs, args.repeats, warmup=1, cuda=cuda)
    base = res["a_reference"]["min_s"]
    rows = {
        k: {
            "seconds": r["min_s"],
            "median_s": r["median_s"],
            "images_per_s": args.batch / r["min_s"],
            "speedup_vs_reference": base / r["min_s"],
        }
        for k, r in res.items()
    }
    if "c_compiled_reference" in rows:
        rows["b_fused"]["speedup_vs_compiled"] = res["c_compiled_reference"]["min_s"] / res["b_fused"]["min_s"]
    tokens = (args.latent // 2) ** 2
    print(
        f"{args.model}, batch {args.batch}, {tokens} tokens, {args.precision}, {device}: one training step "
        "(forward, backward, AdamW, EMA)"
    )
    for k, r in rows.items():
        print(f"  {k:22s} {r['seconds']:8.3f} s  {r['images_per_s']:8.2f} img/s  x{r['speedup_vs_reference']:.2f}")
    if compile_s is not None:
        print(f"  (first compiled step, compilation included: {compile_s:.1f} s)")
    # a bf16 run is a result of its own beside the float32 one (its own table in docs/benchmarks.md)
    variant = "" if args.precision == "fp32" else args.precision
    name = f"training_{device_tag(device)}{'_' + variant if variant else ''}{'_quick' if args.quick else ''}.json"
    path = write_json(
        result_path(name),
        {
            "machine": machine,
            "model": args.model,
            "batch": args.batch,
            "tokens": tokens,
            "precision": args.precision,
            "results": rows,
            "compile_seconds": compile_s,
            "targets_gpu": {"fused_vs_reference": 1.5, "fused_vs_compiled": 1.15},
            **({"variant": variant} if variant else {}),
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
