"""The `ddt-fast` command line (also `python -m ddt_fast`)."""
from __future__ import annotations

import argparse
import json
import os
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


# sampling options a published config may set, and their defaults when neither it nor the command line does
SAMPLING_DEFAULTS = dict(steps=250, guidance=2.0, interval_min=0.3, interval_max=1.0, shift=1.0, last_step=0.04,
                         sampler="euler", order=2, latent_size=32)


def _resolve_sampling(args) -> None:
    """Fill the sampling options: command line, else the published config (--config), else the defaults."""
    from ddt_fast.config_files import published_settings, read_config

    published = {"model": {}, "options": {}, "latent_size": None, "sampler": None}
    if args.config:
        published = published_settings(read_config(args.config), args.config)
    opts = dict(published["options"], sampler=published["sampler"], latent_size=published["latent_size"])
    if args.interval is not None:
        args.interval_min, args.interval_max = args.interval
    for key, default in SAMPLING_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, opts[key] if opts.get(key) is not None else default)
    args.interval = (args.interval_min, args.interval_max)
    if getattr(args, "schedule", "") is None:  # calibrate has no --schedule
        rate = int(opts.get("refresh_rate") or 1)
        args.schedule = "every" if rate == 1 else f"uniform:{rate}"
    args.model_config = published["model"]


def _load_model(args):
    import torch

    from ddt_fast.models import CheckpointError, from_pretrained

    _init_distributed(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    arch = args.model_config
    kwargs = {k: arch[k] for k in ("num_encoder_blocks", "in_channels", "patch_size") if k in arch}
    if args.encoder_blocks is not None:
        kwargs["num_encoder_blocks"] = args.encoder_blocks
    model = from_pretrained(args.ckpt, ema=not args.no_ema, **kwargs)
    differ = {k: (v, model.config[k]) for k, v in arch.items() if k in model.config and model.config[k] != v}
    if differ:
        raise CheckpointError(f"the weights in {args.ckpt} do not match model.denoiser.init_args of {args.config} "
                              f"(config, weights): {differ}; is it the config of this checkpoint?")
    return model.to(device).eval(), device


def _sampler(args, schedule=None, mode=None):
    from ddt_fast import sampling

    lo, hi = args.interval
    if args.sampler not in ("euler", "adams"):
        raise CliError(f"--sampler must be euler or adams, got {args.sampler!r}")
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


SCHEDULE_SYNTAX = "every, uniform:R, dp:K, dp-ratio:R, dp-tol:X, or a schedule / calibration JSON file"


def _check_schedule(spec: str):
    """`(kind, value)` of a --schedule value, checked before any work is done."""
    kind, _, value = spec.partition(":")
    parse = {"uniform": int, "dp": int, "dp-ratio": float, "dp-tol": float}
    if spec == "every":
        return "every", None
    if kind in parse and value:
        try:
            return kind, parse[kind](value)
        except ValueError:
            raise CliError(f"--schedule {spec}: {kind} takes {'an integer' if parse[kind] is int else 'a number'}, "
                           f"e.g. {kind}:{4 if parse[kind] is int else 0.8}") from None
    if os.path.isfile(spec):
        return "file", spec
    raise CliError(f"--schedule {spec!r}: unknown schedule (and no such file); use {SCHEDULE_SYNTAX}")


def _schedule(args, model, device):
    """--schedule every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE"""
    kind, value = _check_schedule(args.schedule)
    if not kind.startswith("dp"):
        return args.schedule
    cal = _calibrate(args, model, device)
    try:
        if kind == "dp":
            return cal.schedule(value)
        if kind == "dp-ratio":
            return cal.schedule_for_ratio(value)
        return cal.schedule_for_tolerance(value)
    except ValueError as e:
        raise CliError(f"--schedule {args.schedule}: {e}") from e


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

    _resolve_sampling(args)
    _check_schedule(args.schedule)
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


def _plot_path(args) -> Optional[str]:
    """--plot: a PNG path, 'none', or by default the --out path with .png for .json."""
    if args.plot == "none":
        return None
    if args.plot:
        return args.plot
    root, ext = os.path.splitext(args.out)
    return (root if ext == ".json" else args.out) + ".png"


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ddt_fast.sampling import plot_cost_curve

    _resolve_sampling(args)
    plot = _plot_path(args)
    if plot:
        try:
            import matplotlib  # noqa: F401  (checked before the work, not after)
        except ImportError:
            raise CliError("plotting the cost curve needs matplotlib: pip install matplotlib, or pass --plot none")
    model, device = _load_model(args)
    cal = _calibrate(args, model, device)
    cal.save(args.out)
    curve = cal.curve()
    print(f"wrote {args.out}: DP cost by budget (of {cal.num_steps} steps)")
    for k, cost in curve[: min(len(curve), 12)]:
        print(f"  K={k:4d}  cost={cost:.5f}")
    if plot:
        plot_cost_curve(curve, plot, title=f"{os.path.basename(args.ckpt)}: {cal.num_steps} steps, "
                                           f"guidance {args.guidance}")
        print(f"wrote {plot}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ddt_fast._distributed import rank_world
    from ddt_fast.config_files import ConfigError, load_train_config
    from ddt_fast.models import preset_config
    from ddt_fast.training import Trainer

    config = load_train_config(args.config, args.overrides)
    try:
        preset_config(config.model, **config.model_args)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{args.config}: {e.args[0] if e.args else e}") from e
    result = Trainer(config).fit()
    if rank_world()[0] == 0:
        loss = result["metrics"].get("loss")
        print(f"trained {config.model} to step {result['step']} (loss {loss if loss is None else f'{loss:.5f}'}); "
              f"checkpoint: {result['checkpoint']}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ddt_fast.models import load_checkpoint
    from ddt_fast.training import save_lightning

    if os.path.exists(args.dst) and not args.force:
        raise CliError(f"{args.dst} exists; nothing is overwritten without asking: pass --force or choose "
                       "another output")
    kwargs = dict(num_encoder_blocks=args.encoder_blocks, in_channels=args.in_channels,
                  patch_size=args.patch_size, allow_pickle=args.allow_pickle)
    if os.path.isdir(args.src):  # save_pretrained folder -> Lightning checkpoint
        model = load_checkpoint(args.src, **kwargs)
        weights = model.state_dict()
        save_lightning(args.dst, weights, weights, hyper_parameters={"model_config": model.config})
        print(f"wrote {args.dst}: published Lightning layout (denoiser.* and ema_denoiser.* = the folder's "
              f"weights), {model.config}")
    else:  # any checkpoint file -> save_pretrained folder
        if os.path.isfile(args.dst):
            raise CliError(f"{args.dst} is a file; converting a checkpoint file writes a save_pretrained folder")
        model = load_checkpoint(args.src, ema=not args.no_ema, **kwargs)
        model.save_pretrained(args.dst)
        print(f"wrote {args.dst}/ (config.json + model.safetensors, {'training' if args.no_ema else 'EMA'} "
              f"weights), {model.config}")
    return 0


def _cmd_extract_latents(args: argparse.Namespace) -> int:
    from ddt_fast._distributed import init_from_env, launched_by_torchrun
    from ddt_fast.training import extract_latents

    device = init_from_env(args.device) if launched_by_torchrun() else args.device
    index = extract_latents(args.image_folder, args.out, vae=args.vae, resolution=args.resolution,
                            flip=args.flip, batch_size=args.batch_size, shard_size=args.shard_size,
                            dtype=args.dtype, store_std=not args.no_std, device=device,
                            progress=not args.quiet)
    with open(index) as f:
        n = json.load(f)["num_items"]
    print(f"wrote {index} ({n} latents); train on it with data: {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ddt_fast import demo

    make = demo.DemoSettings.quick if args.quick else demo.DemoSettings
    overrides = {k: v for k, v in dict(out_dir=args.out, train_steps=args.train_steps, seed=args.seed,
                                        device=args.device, per_class=args.per_class, threads=args.threads).items()
                 if v is not None}
    settings = make(progress=not args.quiet, **overrides)
    metrics = demo.run_demo(settings)
    print()
    print(demo.report(metrics))
    print(f"\nwrote {settings.out_dir}/: metrics.json, grids/*.png, cost_vs_budget.png, calibration.json, model/")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file, save_pretrained folder or hub id")
    p.add_argument("--encoder-blocks", type=int, default=None,
                   help="encoder/decoder split, if the checkpoint's architecture is not a published preset")
    p.add_argument("--no-ema", action="store_true", help="use the training weights, not the EMA ones")
    p.add_argument("--config", default=None,
                   help="a YAML config of the published DDT code: the architecture (model.denoiser.init_args), "
                        "the sampler and its settings (model.diffusion_sampler) and data.latent_shape; options "
                        "given here override it")
    d = SAMPLING_DEFAULTS
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default {d['steps']})")
    p.add_argument("--guidance", type=float, default=None, help=f"CFG scale, 1 = none (default {d['guidance']})")
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help=f"guidance interval on the shifted time, strict (default {d['interval_min']} "
                        f"{d['interval_max']})")
    p.add_argument("--shift", type=float, default=None, help=f"time shift (default {d['shift']})")
    p.add_argument("--last-step", type=float, default=None, help=f"size of the last step (default {d['last_step']})")
    p.add_argument("--sampler", choices=("euler", "adams"), default=None, help="default euler")
    p.add_argument("--order", type=int, default=None, help=f"Adams-Bashforth order 1-3 (default {d['order']})")
    p.add_argument("--mode", choices=("fast", "reference"), default="fast",
                   help="fast (default) or reference: step for step the published sampler")
    p.add_argument("--latent-size", type=int, default=None,
                   help=f"latent side, image side / 8 (default {d['latent_size']})")
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
    p.add_argument("--schedule", default=None,
                   help="every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE (schedule or calibration JSON); "
                        "default every, or uniform at the published config's state_refresh_rate")
    p.add_argument("--vae", default="none", help="VAE folder or hub id (sd-vae-ft-ema), or 'none' for latents")
    p.add_argument("--no-png", action="store_true", help="only the .npz, no PNG files")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("calibrate", help="DP calibration: similarity statistic and cost-vs-budget curve (+ PNG)")
    _add_sampling_args(p)
    p.add_argument("--out", required=True, help="calibration JSON (pass it to sample --schedule)")
    p.add_argument("--plot", default=None,
                   help="the cost-vs-budget PNG (default: --out with .png; 'none' for no plot; needs matplotlib)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("train", help="train a DDT from a YAML config (single process or under torchrun)",
                       description="Train a DDT. The config is a flat YAML (or JSON) mapping of TrainConfig "
                                   "fields (see configs/ and the README's Training section); key=value "
                                   "arguments override it. Under torchrun every process joins the group.")
    p.add_argument("--config", required=True, help="training config (.yaml / .json), e.g. configs/digits_tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides, values parsed as YAML: steps=100 lr=3e-4 model_args.hidden_size=64 resume=true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("convert", help="published Lightning checkpoint <-> save_pretrained folder",
                       description="A checkpoint file (published Lightning .ckpt, ddt_fast training checkpoint, "
                                   "state dict, .safetensors) becomes a save_pretrained folder (config.json + "
                                   "model.safetensors); a save_pretrained folder becomes a Lightning checkpoint in "
                                   "the published layout. Files are written to a temporary name and renamed.")
    p.add_argument("src", metavar="IN", help="checkpoint file or save_pretrained folder")
    p.add_argument("dst", metavar="OUT", help="save_pretrained folder or .ckpt file (the other kind)")
    p.add_argument("--no-ema", action="store_true", help="take the training weights (denoiser.*), not the EMA ones")
    p.add_argument("--encoder-blocks", type=int, default=None,
                   help="encoder/decoder split, if neither the file nor a published preset gives it")
    p.add_argument("--in-channels", type=int, default=None, help="if the patch features do not factor as 4 * p^2")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--allow-pickle", action="store_true",
                   help="open files holding Python objects (torch.load weights_only=False; trusted files only)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("extract-latents", help="encode an image folder into latent shards with the SD VAE",
                       description="Encode IMAGE_FOLDER (root/<class>/<images>) with the Stable Diffusion VAE into "
                                   "safetensors shards + index.json, the latent dataset `train` reads "
                                   "(data: OUT). Resumable; under torchrun rank r encodes shards r, r+W, ...")
    p.add_argument("image_folder", metavar="IMAGE_FOLDER")
    p.add_argument("out", metavar="OUT", help="output folder (new or an earlier, unfinished extraction)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="VAE folder or model-hub id")
    p.add_argument("--resolution", type=int, default=256, help="center-crop side in pixels")
    p.add_argument("--flip", action="store_true", help="also encode every image mirrored")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024, help="latents per shard file")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--no-std", action="store_true", help="do not store the posterior std")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract_latents)

    p = sub.add_parser("demo", help="train a digits DDT on the CPU, calibrate DP, compare schedules",
                       description="Trains a small class-conditional DDT on scikit-learn's 8x8 digits (CPU, "
                                   "minutes), calibrates the DP schedule, samples every class with CFG under "
                                   "every step and uniform / DP schedules at K = N/2, N/4, N/5, N/8, and scores "
                                   "them with a digits classifier (accuracy, Frechet distance). Writes OUT/ "
                                   "and prints a table.")
    p.add_argument("--out", default=None, help="output folder (default demo_out, quick: demo_out_quick)")
    p.add_argument("--quick", action="store_true", help="a one-minute version (few training steps, few samples)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 1200, quick 250)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class and schedule (default 50)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="default cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: the model is tiny; robust on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ddt_fast.models import CheckpointError
    from ddt_fast.training import DatasetError, NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, CheckpointError, DatasetError, NonFiniteLossError, FileNotFoundError, FileExistsError,
            ImportError, ValueError) as e:
        print(f"ddt-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
