"""The `ddt-fast` command line (also `python -m ddt_fast`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import ddt_fast

    report = ddt_fast.info()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _init_distributed(args) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1):
    nccl with one GPU per local rank, gloo on the CPU."""
    from ddt_fast._distributed import init_from_env, launched_by_torchrun

    if launched_by_torchrun():
        args.device = str(init_from_env(args.device))


def _load_model(args):
    import torch

    from ddt_fast.models import from_pretrained

    _init_distributed(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {} if args.encoder_blocks is None else {"num_encoder_blocks": args.encoder_blocks}
    model = from_pretrained(args.ckpt, ema=not args.no_ema, **kwargs)
    return model.to(device).eval(), device


def _sampler(args, schedule=None, mode=None):
    from ddt_fast import sampling

    lo, hi = args.interval
    common = dict(num_steps=args.steps, guidance=args.guidance, timeshift=args.shift, guidance_interval_min=lo,
                  guidance_interval_max=hi, last_step=args.last_step, schedule=schedule,
                  mode=mode or args.mode, progress=not args.quiet)
    if args.sampler == "adams":
        return sampling.AdamsSampler(order=args.order, **common)
    return sampling.EulerSampler(**common)


def _calibrate(args, model, device):
    from ddt_fast import sampling

    return sampling.calibrate(model, _sampler(args, mode="reference"), num_samples=args.calib_samples,
                              seed=args.seed, latent_size=args.latent_size, device=device)


def _schedule(args, model, device):
    """--schedule every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE"""
    spec = args.schedule
    if spec.startswith(("dp:", "dp-ratio:", "dp-tol:")):
        kind, value = spec.split(":", 1)
        cal = _calibrate(args, model, device)
        try:
            if kind == "dp":
                return cal.schedule(int(value))
            if kind == "dp-ratio":
                return cal.schedule_for_ratio(float(value))
            return cal.schedule_for_tolerance(float(value))
        except ValueError as e:
            raise CliError(f"--schedule {spec}: {e}") from e
    return spec


def _parse_classes(text: str, num_classes: int, n: int):
    if text == "random":
        import torch

        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        ids = [int(c) for c in text.replace(",", " ").split()]
    except ValueError as e:
        raise CliError(f"--classes takes integers separated by commas, or 'random': {e}") from e
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise CliError(f"--classes {bad} out of range: class ids are 0..{num_classes - 1}")
    return [ids[k % len(ids)] for k in range(n)]


def _cmd_sample(args: argparse.Namespace) -> int:
    from ddt_fast import sampling

    model, device = _load_model(args)
    n = args.num_images
    classes = _parse_classes(args.classes, model.num_classes, n)
    sampler = _sampler(args, _schedule(args, model, device))
    vae = None if args.vae == "none" else sampling.load_vae(args.vae, device=device)
    path = sampling.sample_to_folder(model, sampler, classes, range(args.seed, args.seed + n), args.out,
                                     batch_size=args.batch_size, vae=vae, latent_size=args.latent_size,
                                     png=not args.no_png, progress=not args.quiet)
    print(f"wrote {path} ({n} {'images' if vae is not None else 'latents'}, schedule: "
          f"{sampler.schedule.budget}/{sampler.num_steps} encoder steps)")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    model, device = _load_model(args)
    cal = _calibrate(args, model, device)
    cal.save(args.out)
    curve = cal.curve()
    print(f"wrote {args.out}: DP cost by budget (of {cal.num_steps} steps)")
    for k, cost in curve[: min(len(curve), 12)]:
        print(f"  K={k:4d}  cost={cost:.5f}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([k for k, _ in curve], [c for _, c in curve])
        ax.set_xlabel("encoder runs (budget K)")
        ax.set_ylabel("DP cost")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file, save_pretrained folder or hub id")
    p.add_argument("--encoder-blocks", type=int, default=None,
                   help="encoder/decoder split, if the checkpoint's architecture is not a published preset")
    p.add_argument("--no-ema", action="store_true", help="use the training weights, not the EMA ones")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--interval", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"),
                   help="guidance interval on the shifted time (strict)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift")
    p.add_argument("--last-step", type=float, default=0.04)
    p.add_argument("--sampler", choices=("euler", "adams"), default="euler")
    p.add_argument("--order", type=int, default=2, help="Adams-Bashforth order (1-3)")
    p.add_argument("--mode", choices=("fast", "reference"), default="fast")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=8, help="samples in a DP calibration")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and runtime report: versions, kernels, archs, backends")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("sample", help="sample latents or images to a folder (resumable; torchrun for many GPUs)")
    _add_sampling_args(p)
    p.add_argument("--classes", default="random", help="class ids, e.g. 207,360,387 (cycled), or 'random'")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--schedule", default="every",
                   help="every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE (schedule or calibration JSON)")
    p.add_argument("--vae", default="none", help="VAE folder or hub id (sd-vae-ft-ema), or 'none' for latents")
    p.add_argument("--no-png", action="store_true", help="only the .npz, no PNG files")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("calibrate", help="DP calibration: similarity statistic and cost-vs-budget curve")
    _add_sampling_args(p)
    p.add_argument("--out", required=True, help="calibration JSON (pass it to sample --schedule)")
    p.add_argument("--plot", default=None, help="also plot the cost curve to this PNG (needs matplotlib)")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ddt_fast.models import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"ddt-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
