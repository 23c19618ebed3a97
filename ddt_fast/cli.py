"""The `ddt-fast` command line (also `python -m ddt_fast`).

Every argument is checked before any work (before a model is loaded, a
calibration run or training starts); a bad one stops the command with one
line on stderr, `ddt-fast <command>: error: ...`, naming the argument and the
fix, and exit status 2. A path that does not exist is reported as not found,
never looked up on the model hub. Nothing existing is replaced without
--force."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import List, Optional, Tuple

__all__ = [
    "CliError",
    "WEIGHTS_NAME",
    "WEIGHT_SUFFIXES",
    "SEED_RANGE",
    "SAMPLING_DEFAULTS",
    "OPTION_FLAGS",
    "PUBLISHED_NAMES",
    "SCHEDULE_SYNTAX",
    "build_parser",
    "main",
]


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


# ---------------------------------------------------------------------------
# argument checks: all of them run before any work


def _check_int(value, name: str, lo: int = 1, hi: Optional[int] = None) -> int:
    """An int in lo..hi (hi None: no upper bound), else CliError naming `name`."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise CliError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _check_number(
    value,
    name: str,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> float:
    """A finite number within the bounds (open or closed), else CliError naming `name`."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    bad = number is None or not math.isfinite(number)
    if not bad and lo is not None:
        bad = number <= lo if lo_open else number < lo
    if not bad and hi is not None:
        bad = number >= hi if hi_open else number > hi
    if bad:
        bound = ""
        if lo is not None and hi is not None:
            bound = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            bound = f" {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            bound = f" {'<' if hi_open else '<='} {hi:g}"
        hint = f" ({hint})" if hint else ""
        raise CliError(f"{name} must be a finite number{bound}{hint}, got {value!r}")
    return float(number)


def _check_device(spec: Optional[str], name: str = "--device") -> None:
    """A device torch can parse and this machine has: cpu, cuda[:N] (N < the device count) or mps."""
    if spec is None:
        return
    import warnings

    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"{name} {spec!r} is not a device: use cpu, cuda or cuda:N") from None
    with warnings.catch_warnings():  # a machine without a driver warns here; the error below says it
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise CliError(
                    f"{name} {spec}: CUDA is not available here (torch {torch.__version__}, CUDA build "
                    f"{torch.version.cuda or 'none'}); use --device cpu"
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise CliError(f"{name} {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        elif device.type == "mps":
            if not torch.backends.mps.is_available():
                raise CliError(f"{name} {spec}: MPS is not available here; use --device cpu")
        elif device.type != "cpu":
            raise CliError(f"{name} {spec}: ddt-fast runs on cpu, cuda[:N] or mps")


WEIGHTS_NAME = "model.safetensors"  # what a save_pretrained folder holds (models.checkpoint.WEIGHTS_NAME)
WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin")
# a model-hub repository id: owner/name, letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_source(value: str, name: str, needs: str, hub: bool = True) -> None:
    """A --ckpt / --vae / IN value: an existing file or folder (a folder must hold `needs`), or, when
    `hub`, a model-hub id. What can only be a local path (it starts with '.', '/' or '~', ends with a
    weights suffix, or its first part is a local folder) is reported as not found here; from_pretrained
    and diffusers would look it up on the hub instead."""
    if os.path.isdir(value):
        if not os.path.exists(os.path.join(value, needs)):
            raise CliError(f"{name} {value}: the folder has no {needs}; pass the folder that holds it")
        return
    if os.path.exists(value):
        return
    if not hub:
        raise CliError(
            f"{name} {value}: checkpoint not found (give an existing checkpoint file or save_pretrained folder)"
        )
    owner = value.split("/", 1)[0]
    if value.startswith((".", "/", "~")) or "\\" in value:
        why = "a path starting with '.', '/' or '~' is never looked up on the model hub"
    elif value.lower().endswith(WEIGHT_SUFFIXES):
        why = f"a name ending in {os.path.splitext(value)[1]} is a file, not a hub id"
    elif not _HUB_ID.match(value):
        why = "a hub id is owner/name"
    elif os.path.isdir(owner):
        why = f"{owner}/ is a local folder, so this is a path, not a hub id"
    else:
        return  # a hub id: fetched when loaded
    raise CliError(f"{name} {value}: not found (neither an existing path nor a hub id: {why})")


def _check_out(path: str, name: str, folder: bool) -> None:
    """An output path that can be created: no file where a folder goes (or the reverse), and a
    writable folder to create it in."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{name} {path} is a file; give a folder")
    if not folder and os.path.isdir(path):
        raise CliError(f"{name} {path} is a folder; give a file path")
    parent = os.path.abspath(path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CliError(f"{name} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{name} {path}: permission denied (cannot write in {parent}); choose another path")


def _check_new_file(path: str, name: str, force: bool) -> None:
    """An output file: writable, and not replaced unless --force."""
    _check_out(path, name, folder=False)
    if os.path.lexists(path) and not force:
        raise CliError(
            f"{name} {path} exists; nothing is overwritten without asking: pass --force to replace "
            "it, or choose another path"
        )


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _check_seeds(seed: int, first: int, last: int, name: str = "--seed") -> None:
    """The noise seeds a run derives from --seed (first..last) fit torch's generator."""
    _check_int(seed, name, lo=SEED_RANGE[0])
    if first < SEED_RANGE[0] or last > SEED_RANGE[1]:
        raise CliError(
            f"{name} {seed}: the noise seeds derived from it ({first}..{last}) do not fit in 64 bits; "
            "use a smaller seed"
        )


def _init_distributed(args) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1):
    nccl with one GPU per local rank, gloo on the CPU."""
    from ddt_fast._distributed import init_from_env, launched_by_torchrun

    if launched_by_torchrun():
        args.device = str(init_from_env(args.device))


# ---------------------------------------------------------------------------
# sample, calibrate


# sampling options a published config may set, and their defaults when neither it nor the command line does
SAMPLING_DEFAULTS = dict(
    steps=250,
    guidance=2.0,
    interval_min=0.3,
    interval_max=1.0,
    shift=1.0,
    last_step=0.04,
    sampler="euler",
    order=2,
    latent_size=32,
)
# the flag of each option, and its name in a published config
OPTION_FLAGS = dict(
    steps="--steps",
    guidance="--guidance",
    interval_min="--interval MIN",
    interval_max="--interval MAX",
    shift="--shift",
    last_step="--last-step",
    sampler="--sampler",
    order="--order",
    latent_size="--latent-size",
    schedule="--schedule",
)
PUBLISHED_NAMES = dict(
    steps="num_steps",
    guidance="guidance",
    interval_min="guidance_interval_min",
    interval_max="guidance_interval_max",
    shift="timeshift",
    last_step="last_step",
    sampler="class_path",
    order="order",
    latent_size="data.latent_shape",
    schedule="state_refresh_rate",
)


def _resolve_sampling(args) -> None:
    """Fill the sampling options: command line, else the published config (--config), else the defaults.
    `args.from_config` lists the options the config gave (error messages name them)."""
    from ddt_fast.config_files import published_settings, read_config

    published = {"model": {}, "options": {}, "latent_size": None, "sampler": None}
    if args.config:
        published = published_settings(read_config(args.config), args.config)
    opts = dict(published["options"], sampler=published["sampler"], latent_size=published["latent_size"])
    if args.interval is not None:
        args.interval_min, args.interval_max = args.interval
    args.from_config = set()
    for key, default in SAMPLING_DEFAULTS.items():
        if getattr(args, key, None) is None:
            if opts.get(key) is not None:
                args.from_config.add(key)
            setattr(args, key, opts[key] if opts.get(key) is not None else default)
    args.interval = (args.interval_min, args.interval_max)
    if getattr(args, "schedule", "") is None:  # calibrate has no --schedule
        rate = opts.get("refresh_rate")
        if rate is not None:
            args.from_config.add("schedule")
            _check_int(rate, _option(args, "schedule"))
        args.schedule = "every" if rate in (None, 1) else f"uniform:{rate}"
    args.model_config = published["model"]


def _option(args, key: str) -> str:
    """How an error names a sampling option: its flag, and where the value came from if not the command line."""
    if key in getattr(args, "from_config", ()):
        return f"{OPTION_FLAGS[key]} ({PUBLISHED_NAMES[key]} from {args.config})"
    return OPTION_FLAGS[key]


def _check_sampling(args) -> None:
    """The sampling options sample and calibrate share (values first, then paths and the device)."""
    opt = lambda key: _option(args, key)  # noqa: E731
    _check_int(args.steps, opt("steps"))
    _check_number(args.guidance, opt("guidance"), lo=0, hint="1 = no guidance, 0 = the unconditional model")
    lo, hi = args.interval
    # guided where MIN < t < MAX on the shifted time t in [0, 1): MIN < 0 takes in t = 0, MAX >= 1 runs to the
    # end; MIN > 1 or MAX < 0 guides no step (e.g. percentages given for fractions)
    _check_number(lo, opt("interval_min"), hi=1, hint="the interval is on the shifted time, 0..1")
    _check_number(hi, opt("interval_max"), lo=0, hint="the interval is on the shifted time, 0..1")
    if lo > hi:
        where = (
            f" (guidance_interval_min/max from {args.config})"
            if {"interval_min", "interval_max"} & args.from_config
            else ""
        )
        raise CliError(f"--interval{where} {lo:g} {hi:g}: MIN > MAX; the guidance interval is MIN MAX, MIN <= MAX")
    _check_number(args.shift, opt("shift"), lo=0, lo_open=True, hint="1 = no shift")
    _check_number(args.last_step, opt("last_step"), lo=0, hi=1, lo_open=True)
    if args.sampler not in ("euler", "adams"):
        raise CliError(f"{opt('sampler')} must be euler or adams, got {args.sampler!r}")
    _check_int(args.order, opt("order"), 1, 3)
    _check_int(args.latent_size, opt("latent_size"))
    _check_int(args.calib_samples, "--calib-samples")
    if args.encoder_blocks is not None:
        _check_int(args.encoder_blocks, "--encoder-blocks")


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
        raise CheckpointError(
            f"the weights in {args.ckpt} do not match model.denoiser.init_args of {args.config} "
            f"(config, weights): {differ}; is it the config of this checkpoint?"
        )
    if args.latent_size % model.patch_size:
        raise CliError(
            f"{_option(args, 'latent_size')} {args.latent_size} is not a multiple of the model's patch "
            f"size {model.patch_size}"
        )
    return model.to(device).eval(), device


def _sampler(args, schedule=None, mode=None):
    from ddt_fast import sampling

    lo, hi = args.interval
    common = dict(
        num_steps=args.steps,
        guidance=args.guidance,
        timeshift=args.shift,
        guidance_interval_min=lo,
        guidance_interval_max=hi,
        last_step=args.last_step,
        schedule=schedule,
        mode=mode or args.mode,
        progress=not args.quiet,
    )
    if args.sampler == "adams":
        return sampling.AdamsSampler(order=args.order, **common)
    return sampling.EulerSampler(**common)


def _calibrate(args, model, device):
    from ddt_fast import sampling

    return sampling.calibrate(
        model,
        _sampler(args, mode="reference"),
        num_samples=args.calib_samples,
        seed=args.seed,
        latent_size=args.latent_size,
        device=device,
    )


def _check_calibration_seeds(args) -> None:
    """A calibration draws its noise from seeds --seed * 1000003 + k, k < --calib-samples."""
    base = args.seed * 1_000_003 if isinstance(args.seed, int) else 0
    _check_seeds(args.seed, base, base + args.calib_samples - 1)


SCHEDULE_SYNTAX = "every, uniform:R, dp:K, dp-ratio:R, dp-tol:X, or a schedule / calibration JSON file"


def _schedule_file_steps(path: str) -> int:
    """The step count a schedule or calibration file is for (the file is read, nothing is computed)."""
    from ddt_fast.schedule import Schedule

    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"--schedule {path} is not valid JSON ({e}); give a schedule or calibration file") from None
    if isinstance(d, dict) and d.get("format") == "ddt_fast.calibration":
        sim = d.get("similarity")
        if not isinstance(sim, list) or not sim:
            raise CliError(f"--schedule {path}: a calibration file without its similarity matrix; calibrate again")
        return len(sim)
    try:
        return Schedule.from_dict(d).num_steps
    except (KeyError, TypeError, ValueError) as e:
        raise CliError(f"--schedule {path} is neither a schedule nor a calibration file: {e}") from None


def _check_schedule(args) -> Tuple[str, object]:
    """`(kind, value)` of --schedule, checked against --steps before any work."""
    spec, steps, name = args.schedule, args.steps, _option(args, "schedule")
    kind, _, value = spec.partition(":")
    parse = {"uniform": int, "dp": int, "dp-ratio": float, "dp-tol": float}
    if spec == "every":
        return "every", None
    if kind in parse and value:
        try:
            number = parse[kind](value)
        except ValueError:
            raise CliError(
                f"{name} {spec}: {kind} takes {'an integer' if parse[kind] is int else 'a number'}, "
                f"e.g. {kind}:{4 if parse[kind] is int else 0.8}"
            ) from None
        if kind == "uniform" and not 1 <= number <= steps:
            raise CliError(f"{name} {spec}: the refresh_rate R of uniform:R must be in 1..{steps} (--steps)")
        if kind == "dp" and not 1 <= number <= steps:
            raise CliError(f"{name} {spec}: the budget K of dp:K must be in 1..{steps} (--steps)")
        if kind == "dp-ratio" and not 0.0 <= number < 1.0:
            raise CliError(
                f"{name} {spec}: the sharing ratio of dp-ratio:R must be in [0, 1) (0.8 reuses the "
                "encoder's output at 80% of the steps)"
            )
        if kind == "dp-tol" and not number >= 0.0:  # NaN fails too
            raise CliError(f"{name} {spec}: the cost tolerance of dp-tol:X must be a number >= 0")
        return kind, number
    if os.path.isfile(spec):
        n = _schedule_file_steps(spec)
        if n != steps:
            raise CliError(
                f"{name} {spec} is for {n} steps but {_option(args, 'steps')} is {steps}; pass "
                f"--steps {n}, or calibrate for {steps} steps"
            )
        return "file", spec
    raise CliError(f"{name} {spec!r}: unknown schedule (and no such file); use {SCHEDULE_SYNTAX}")


def _schedule(args, model, device, kind, value):
    """--schedule every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE"""
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


def _class_ids(text: str) -> Optional[List[int]]:
    """--classes as a list of ints (None for 'random'); the range is checked once the model is loaded."""
    if text == "random":
        return None
    try:
        ids = [int(c) for c in text.replace(",", " ").split()]
    except ValueError as e:
        raise CliError(f"--classes takes integers separated by commas, or 'random': {e}") from None
    if not ids:
        raise CliError("--classes is empty: give class ids, e.g. 207,360,387, or 'random'")
    return ids


def _parse_classes(ids: Optional[List[int]], num_classes: int, n: int):
    if ids is None:
        import torch

        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise CliError(f"--classes {bad} out of range: class ids are 0..{num_classes - 1}")
    return [ids[k % len(ids)] for k in range(n)]


def _load_vae(args, device):
    from ddt_fast import sampling

    try:
        return sampling.load_vae(args.vae, device=device)
    except RuntimeError as e:
        raise CliError(f"--vae {args.vae}: {e}") from e


def _cmd_sample(args: argparse.Namespace) -> int:
    from ddt_fast import sampling

    _resolve_sampling(args)
    _check_sampling(args)
    n = _check_int(args.num_images, "--num-images")
    _check_int(args.batch_size, "--batch-size")
    ids = _class_ids(args.classes)
    kind, value = _check_schedule(args)
    _check_seeds(args.seed, args.seed, args.seed + n - 1)
    if kind.startswith("dp"):
        _check_calibration_seeds(args)
    _check_source(args.ckpt, "--ckpt", needs=WEIGHTS_NAME)
    if args.vae != "none":
        _check_source(args.vae, "--vae", needs="config.json")
    _check_out(args.out, "--out", folder=True)
    _check_device(args.device)

    model, device = _load_model(args)
    classes = _parse_classes(ids, model.num_classes, n)
    vae = None if args.vae == "none" else _load_vae(args, device)  # before a calibration, not after
    sampler = _sampler(args, _schedule(args, model, device, kind, value))
    path = sampling.sample_to_folder(
        model,
        sampler,
        classes,
        range(args.seed, args.seed + n),
        args.out,
        batch_size=args.batch_size,
        vae=vae,
        latent_size=args.latent_size,
        png=not args.no_png,
        progress=not args.quiet,
        overwrite=args.force,
    )
    print(
        f"wrote {path} ({n} {'images' if vae is not None else 'latents'}, schedule: "
        f"{sampler.schedule.budget}/{sampler.num_steps} encoder steps)"
    )
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
    _check_sampling(args)
    _check_calibration_seeds(args)
    _check_source(args.ckpt, "--ckpt", needs=WEIGHTS_NAME)
    earlier = None if args.force else _earlier_calibration(args.out)
    if earlier is None:
        _check_new_file(args.out, "--out", args.force)
    plot = _plot_path(args)
    if plot:
        if os.path.abspath(plot) == os.path.abspath(args.out):
            raise CliError(f"--plot {plot} is the --out path; give the plot another name (or --plot none)")
        if earlier is None:
            _check_new_file(plot, "--plot", args.force)
        try:
            import matplotlib  # noqa: F401  (checked before the work, not after)
        except ImportError:
            raise CliError(
                "plotting the cost curve needs matplotlib: pip install matplotlib, or pass --plot none"
            ) from None
    _check_device(args.device)

    model, device = _load_model(args)
    if earlier is not None:  # the same settings and weights: reuse it; anything else: refuse
        from ddt_fast.sampling import calibration_settings

        differ = earlier.differences(
            calibration_settings(
                model,
                _sampler(args, mode="reference"),
                num_samples=args.calib_samples,
                seed=args.seed,
                latent_size=args.latent_size,
            )
        )
        if differ:
            shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(differ.items())[:4])
            raise CliError(
                f"--out {args.out} is a calibration made with other settings ({shown}); nothing is "
                "overwritten without asking: pass --force to replace it, or choose another path"
            )
        cal = earlier
        print(f"{args.out} is up to date (same settings and weights): reused")
        if plot and os.path.lexists(plot):
            plot = None
    else:
        cal = _calibrate(args, model, device)
        cal.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}: DP cost by budget (of {cal.num_steps} steps)")
    curve = cal.curve()
    for k, cost in curve[: min(len(curve), 12)]:
        print(f"  K={k:4d}  cost={cost:.5f}")
    if plot:
        plot_cost_curve(
            curve,
            plot,
            title=f"{os.path.basename(args.ckpt)}: {cal.num_steps} steps, guidance {args.guidance}",
            overwrite=args.force,
        )
        print(f"wrote {plot}")
    return 0


def _earlier_calibration(path: str):
    """The calibration already at --out, if that is one (None when there is no file);
    anything else there is left to the no-overwrite check."""
    from ddt_fast.schedule import Calibration

    if not os.path.isfile(path):
        return None
    try:
        return Calibration.load(path)
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _short(value) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a digest
        return value[:12] + "..."
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------
# train, convert, extract-latents, demo


def _check_train_config(config, path: str) -> None:
    """What TrainConfig.validate leaves to the run: non-finite numbers, the device, input paths."""
    where = f"(in {path} or a KEY=VALUE override)"
    _check_number(config.lr, f"lr {where}", lo=0, lo_open=True)
    _check_number(config.weight_decay, f"weight_decay {where}", lo=0)
    _check_number(config.eps, f"eps {where}", lo=0, lo_open=True)
    _check_number(config.repa_weight, f"repa_weight {where}", lo=0)
    if config.grad_clip is not None:
        _check_number(config.grad_clip, f"grad_clip {where}", lo=0, lo_open=True, hint="or null: no clipping")
    for key in ("device", "init_from", "data", "image_folder", "out_dir"):
        value = getattr(config, key)
        if value is not None and not isinstance(value, str):
            raise CliError(f"{key} {where} must be a string, got {value!r}")
    _check_device(config.device, f"device {where}")
    if config.init_from and not os.path.exists(config.init_from):
        raise CliError(
            f"init_from {where}: {config.init_from} not found (give an existing checkpoint file or "
            "save_pretrained folder)"
        )
    if config.data != "digits" and not os.path.isdir(config.data):
        raise CliError(
            f"data {where}: dataset folder {config.data} not found (data: digits, or a folder written "
            "by ddt-fast extract-latents)"
        )
    if config.image_folder and not os.path.isdir(config.image_folder):
        raise CliError(f"image_folder {where}: {config.image_folder} not found")
    _check_out(config.out_dir, f"out_dir {where}", folder=True)


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
    _check_train_config(config, args.config)

    result = Trainer(config).fit()
    if rank_world()[0] == 0:
        loss = result["metrics"].get("loss")
        print(
            f"trained {config.model} to step {result['step']} (loss {loss if loss is None else f'{loss:.5f}'}); "
            f"checkpoint: {result['checkpoint']}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ddt_fast.models import load_checkpoint
    from ddt_fast.training import save_lightning

    for value, flag in (
        (args.encoder_blocks, "--encoder-blocks"),
        (args.in_channels, "--in-channels"),
        (args.patch_size, "--patch-size"),
    ):
        if value is not None:
            _check_int(value, flag)
    _check_source(args.src, "IN", needs=WEIGHTS_NAME, hub=False)
    to_lightning = os.path.isdir(args.src)  # a save_pretrained folder -> Lightning checkpoint, else the reverse
    if to_lightning and os.path.isdir(args.dst):
        raise CliError(
            f"OUT {args.dst} is a folder; converting a save_pretrained folder writes a checkpoint file "
            "(e.g. model.ckpt)"
        )
    if not to_lightning and os.path.isfile(args.dst):
        raise CliError(f"OUT {args.dst} is a file; converting a checkpoint file writes a save_pretrained folder")
    if os.path.exists(args.dst) and not args.force:
        raise CliError(
            f"OUT {args.dst} exists; nothing is overwritten without asking: pass --force or choose another output"
        )
    _check_out(args.dst, "OUT", folder=not to_lightning)

    kwargs = dict(
        num_encoder_blocks=args.encoder_blocks,
        in_channels=args.in_channels,
        patch_size=args.patch_size,
        allow_pickle=args.allow_pickle,
    )
    if to_lightning:
        model = load_checkpoint(args.src, **kwargs)
        weights = model.state_dict()
        save_lightning(
            args.dst, weights, weights, hyper_parameters={"model_config": model.config}, overwrite=args.force
        )
        print(
            f"wrote {args.dst}: published Lightning layout (denoiser.* and ema_denoiser.* = the folder's "
            f"weights), {model.config}"
        )
    else:
        model = load_checkpoint(args.src, ema=not args.no_ema, **kwargs)
        model.save_pretrained(args.dst, overwrite=args.force)
        print(
            f"wrote {args.dst}/ (config.json + model.safetensors, {'training' if args.no_ema else 'EMA'} "
            f"weights), {model.config}"
        )
    return 0


def _cmd_extract_latents(args: argparse.Namespace) -> int:
    from ddt_fast._distributed import init_from_env, launched_by_torchrun
    from ddt_fast.training import extract_latents

    _check_int(args.resolution, "--resolution", lo=8)
    _check_int(args.batch_size, "--batch-size")
    _check_int(args.shard_size, "--shard-size")
    if not os.path.isdir(args.image_folder):
        raise CliError(
            f"IMAGE_FOLDER {args.image_folder}: image folder not found (expected root/<class name>/<image files>)"
        )
    _check_source(args.vae, "--vae", needs="config.json")
    _check_out(args.out, "OUT", folder=True)
    _check_device(args.device)

    device = init_from_env(args.device) if launched_by_torchrun() else args.device
    index = extract_latents(
        args.image_folder,
        args.out,
        vae=args.vae,
        resolution=args.resolution,
        flip=args.flip,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        store_std=not args.no_std,
        device=device,
        progress=not args.quiet,
    )
    with open(index) as f:
        n = json.load(f)["num_items"]
    print(f"wrote {index} ({n} latents); train on it with data: {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ddt_fast import demo
    from ddt_fast.training import list_checkpoints

    for value, flag in (
        (args.train_steps, "--train-steps"),
        (args.per_class, "--per-class"),
        (args.threads, "--threads"),
    ):
        if value is not None:
            _check_int(value, flag)
    if args.seed is not None:  # scikit-learn's random_state takes 0..2^32-1
        _check_int(args.seed, "--seed", lo=0, hi=2**32 - 1)
    _check_device(args.device)
    make = demo.DemoSettings.quick if args.quick else demo.DemoSettings
    overrides = {
        k: v
        for k, v in dict(
            out_dir=args.out,
            train_steps=args.train_steps,
            seed=args.seed,
            device=args.device,
            per_class=args.per_class,
            threads=args.threads,
        ).items()
        if v is not None
    }
    settings = make(progress=not args.quiet, **overrides)
    _check_out(settings.out_dir, "--out", folder=True)
    done = list_checkpoints(os.path.join(settings.out_dir, "train"))
    if done and done[-1][0] > settings.train_steps:
        raise CliError(
            f"--out {settings.out_dir} holds a run trained for {done[-1][0]} steps, more than "
            f"--train-steps {settings.train_steps}; pass --train-steps {done[-1][0]} or another --out"
        )

    metrics = demo.run_demo(settings)
    print()
    print(demo.report(metrics))
    print(f"\nwrote {settings.out_dir}/: metrics.json, grids/*.png, cost_vs_budget.png, calibration.json, model/")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint file, save_pretrained folder or model-hub id (owner/name); a path that does not "
        "exist is an error, never a hub lookup",
    )
    p.add_argument(
        "--encoder-blocks",
        type=int,
        default=None,
        help="encoder/decoder split, if the checkpoint's architecture is not a published preset",
    )
    p.add_argument("--no-ema", action="store_true", help="use the training weights, not the EMA ones")
    p.add_argument(
        "--config",
        default=None,
        help="a YAML config of the published DDT code: the architecture (model.denoiser.init_args), "
        "the sampler and its settings (model.diffusion_sampler) and data.latent_shape; options "
        "given here override it",
    )
    d = SAMPLING_DEFAULTS
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default {d['steps']})")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale >= 0: 1 = none, 0 = the unconditional model (default {d['guidance']})",
    )
    p.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help=f"guidance interval on the shifted time t in 0..1, strict: guided where MIN < t < MAX "
        f"(MIN <= MAX; MIN < 0 takes in t = 0) (default {d['interval_min']} {d['interval_max']})",
    )
    p.add_argument("--shift", type=float, default=None, help=f"time shift > 0, 1 = none (default {d['shift']})")
    p.add_argument(
        "--last-step", type=float, default=None, help=f"size of the last step, in (0, 1] (default {d['last_step']})"
    )
    p.add_argument("--sampler", choices=("euler", "adams"), default=None, help="default euler")
    p.add_argument("--order", type=int, default=None, help=f"Adams-Bashforth order 1-3 (default {d['order']})")
    p.add_argument(
        "--mode",
        choices=("fast", "reference"),
        default="fast",
        help="fast (default) or reference: step for step the published sampler",
    )
    p.add_argument(
        "--latent-size", type=int, default=None, help=f"latent side, image side / 8 (default {d['latent_size']})"
    )
    p.add_argument("--seed", type=int, default=0, help="sample i's noise comes from seed + i (default 0)")
    p.add_argument("--calib-samples", type=int, default=8, help="samples in a DP calibration (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: `ddt-fast <command>: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddt-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and runtime report: versions, kernels, archs, backends")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("sample", help="sample latents or images to a folder (resumable; torchrun for many GPUs)")
    _add_sampling_args(p)
    p.add_argument("--classes", default="random", help="class ids, e.g. 207,360,387 (cycled), or 'random'")
    p.add_argument("--num-images", type=int, default=8, help="default 8")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument(
        "--schedule",
        default=None,
        help="every | uniform:R | dp:K | dp-ratio:R | dp-tol:X | FILE (schedule or calibration JSON); "
        "default every, or uniform at the published config's state_refresh_rate",
    )
    p.add_argument(
        "--vae",
        default="none",
        help="VAE folder or model-hub id (stabilityai/sd-vae-ft-ema), or 'none' for latents (default)",
    )
    p.add_argument("--no-png", action="store_true", help="only the .npz, no PNG files")
    p.add_argument(
        "--out", required=True, help="output folder; a run stopped early resumes there with the same arguments"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the samples in --out if they were made with other settings (without it such a folder is refused)",
    )
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("calibrate", help="DP calibration: similarity statistic and cost-vs-budget curve (+ PNG)")
    _add_sampling_args(p)
    p.add_argument("--out", required=True, help="calibration JSON (pass it to sample --schedule)")
    p.add_argument(
        "--plot",
        default=None,
        help="the cost-vs-budget PNG (default: --out with .png; 'none' for no plot; needs matplotlib)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out (and plot); without it they are refused before any work",
    )
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "train",
        help="train a DDT from a YAML config (single process or under torchrun)",
        description="Train a DDT. The config is a flat YAML (or JSON) mapping of TrainConfig "
        "fields (see configs/ and docs/training.md); key=value "
        "arguments override it. Under torchrun every process joins the group.",
    )
    p.add_argument("--config", required=True, help="training config (.yaml / .json), e.g. configs/digits_tiny.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides, values parsed as YAML: steps=100 lr=3e-4 model_args.hidden_size=64 resume=true",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "convert",
        help="published Lightning checkpoint <-> save_pretrained folder",
        description="A checkpoint file (published Lightning .ckpt, ddt_fast training checkpoint, "
        "state dict, .safetensors) becomes a save_pretrained folder (config.json + "
        "model.safetensors); a save_pretrained folder becomes a Lightning checkpoint in "
        "the published layout. Files are written to a temporary name and renamed.",
    )
    p.add_argument("src", metavar="IN", help="checkpoint file or save_pretrained folder")
    p.add_argument("dst", metavar="OUT", help="save_pretrained folder or .ckpt file (the other kind)")
    p.add_argument("--no-ema", action="store_true", help="take the training weights (denoiser.*), not the EMA ones")
    p.add_argument(
        "--encoder-blocks",
        type=int,
        default=None,
        help="encoder/decoder split, if neither the file nor a published preset gives it",
    )
    p.add_argument("--in-channels", type=int, default=None, help="if the patch features do not factor as 4 * p^2")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="open files holding Python objects (torch.load weights_only=False; trusted files only)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (the .ckpt file, or the folder's config.json and "
        "model.safetensors); without it OUT is refused",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "extract-latents",
        help="encode an image folder into latent shards with the SD VAE",
        description="Encode IMAGE_FOLDER (root/<class>/<images>) with the Stable Diffusion VAE into "
        "safetensors shards + index.json, the latent dataset `train` reads "
        "(data: OUT). Resumable; under torchrun rank r encodes shards r, r+W, ...",
    )
    p.add_argument("image_folder", metavar="IMAGE_FOLDER", help="root/<class name>/<image files>")
    p.add_argument("out", metavar="OUT", help="output folder (new or an earlier, unfinished extraction)")
    p.add_argument(
        "--vae",
        default="stabilityai/sd-vae-ft-ema",
        help="VAE folder or model-hub id (a path that does not exist is an error, never a hub lookup)",
    )
    p.add_argument("--resolution", type=int, default=256, help="center-crop side in pixels, >= 8 (default 256)")
    p.add_argument("--flip", action="store_true", help="also encode every image mirrored")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--shard-size", type=int, default=1024, help="latents per shard file (default 1024)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--no-std", action="store_true", help="do not store the posterior std")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract_latents)

    p = sub.add_parser(
        "demo",
        help="train a digits DDT on the CPU, calibrate DP, compare schedules",
        description="Trains a small class-conditional DDT on scikit-learn's 8x8 digits (CPU, "
        "minutes), calibrates the DP schedule, samples every class with CFG under "
        "every step and uniform / DP schedules at K = N/2, N/4, N/5, N/8, and scores "
        "them with a digits classifier (accuracy, Frechet distance). Writes OUT/ "
        "and prints a table.",
    )
    p.add_argument("--out", default=None, help="output folder (default demo_out, quick: demo_out_quick)")
    p.add_argument("--quick", action="store_true", help="a one-minute version (few training steps, few samples)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 1200, quick 250)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class and schedule (default 50)")
    p.add_argument("--seed", type=int, default=None, help="0..2^32-1 (default 0)")
    p.add_argument("--device", default=None, help="default cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: the model is tiny; robust on a shared machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    parser.commands = dict(sub.choices)  # name -> subcommand parser
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (2, with one line on stderr, for a user error).
    Usage errors found by argparse exit 2 the same way (SystemExit)."""
    from ddt_fast.models import CheckpointError
    from ddt_fast.training import DatasetError, NonFiniteLossError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, as argparse would report its other usage errors
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (CliError, CheckpointError, DatasetError, NonFiniteLossError, OSError, ImportError, ValueError) as e:
        # OSError: a file or folder that cannot be read or written (permission denied, disk full, ...)
        message = _one_line(e)
    except RuntimeError as e:
        if not isinstance(e.__cause__, (OSError, ValueError)):  # a bug, not a user error: keep the traceback
            raise
        message = _one_line(e)  # a user error re-worded (e.g. a VAE that could not be loaded)
    print(f"ddt-fast {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
