"""Bad command-line input, one table over every subcommand: each case stops
before any work (no model loaded, no calibration, training, encoding or demo
run, nothing written) with exactly one line on stderr,
`ddt-fast <command>: error: ...` naming the argument, and exit status 2.
Then the samplers' constructors, which reject the same values from Python."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

import ddt_fast._distributed
import ddt_fast.demo
import ddt_fast.models
import ddt_fast.sampling
import ddt_fast.training
from ddt_fast import cli
from ddt_fast.sampling import AdamsSampler, EulerSampler
from ddt_fast.schedule import every_step

# what the commands call to do their work; each fails the test if reached
WORK = [
    (ddt_fast.models, "from_pretrained"),
    (ddt_fast.models, "load_checkpoint"),
    (ddt_fast.training, "Trainer"),
    (ddt_fast.training, "extract_latents"),
    (ddt_fast.training, "save_lightning"),
    (ddt_fast.sampling, "calibrate"),
    (ddt_fast.sampling, "load_vae"),
    (ddt_fast.sampling, "sample_to_folder"),
    (ddt_fast.demo, "run_demo"),
    (ddt_fast._distributed, "init_from_env"),
]


def _refuse(name):
    def work(*args, **kwargs):
        raise AssertionError(f"{name} was called: work started before the bad argument was reported")

    return work


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding what the cases refer to, no GPU, and every work function refusing."""
    for module, name in WORK:
        monkeypatch.setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    for folder in ("runs", "images/a", "empty", "vae_without_config", "pretrained", "demo_run/train/checkpoints"):
        os.makedirs(folder)
    for name in (
        "file.txt",
        "taken.json",
        "taken.png",
        "weights.ckpt",
        "pretrained/model.safetensors",
        "demo_run/train/checkpoints/step_00000500.ckpt",
    ):
        with open(name, "w") as f:
            f.write("x")
    every_step(10).save("schedule10.json")
    with open("calibration10.json", "w") as f:
        json.dump(
            {"format": "ddt_fast.calibration", "version": 1, "settings": {}, "similarity": np.eye(10).tolist()}, f
        )
    train = dict(
        model="DDT-tiny/2",
        model_args=dict(
            in_channels=1,
            num_classes=10,
            hidden_size=32,
            num_groups=2,
            num_blocks=2,
            num_encoder_blocks=1,
            patch_size=2,
        ),
        data="digits",
        global_batch=8,
        steps=3,
        device="cpu",
        tensorboard=False,
        out_dir="runs/train",
    )
    with open("train.json", "w") as f:
        json.dump(train, f)
    with open("train_nan_lr.json", "w") as f:
        json.dump(dict(train, lr=float("nan")), f)  # json writes NaN, and reads it back

    def published(name, **sampler_args):
        with open(name, "w") as f:
            json.dump(
                {
                    "model": {
                        "diffusion_sampler": {"class_path": "src.diffusion.EulerSampler", "init_args": sampler_args}
                    }
                },
                f,
            )

    published("published_steps0.json", num_steps=0)
    published("published_inverted.json", num_steps=10, guidance_interval_min=0.9, guidance_interval_max=0.3)
    published("published_refresh0.json", num_steps=10, state_refresh_rate=0)
    published("published_refresh_big.json", num_steps=10, state_refresh_rate=11)
    return tmp_path


def _files(root):
    """Every file and folder under root, with size and modification time: what a case must leave alone."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


S = ["sample", "--ckpt", "owner/name", "--out", "out", "--steps", "10", "--quiet"]  # a hub id: checked, not fetched
C = ["calibrate", "--ckpt", "owner/name", "--out", "cal.json", "--steps", "10", "--plot", "none", "--quiet"]
T = ["train", "--config", "train.json"]
BIG = str(2**64 - 1)

CASES = [
    # ---- sample: sizes
    (S + ["--steps", "0"], "--steps"),
    (S + ["--steps", "-3"], "--steps"),
    (S + ["--num-images", "0"], "--num-images"),
    (S + ["--batch-size", "0"], "--batch-size"),
    (S + ["--latent-size", "0"], "--latent-size"),
    (S + ["--calib-samples", "0"], "--calib-samples"),
    (S + ["--sampler", "adams", "--order", "4"], "--order"),
    (S + ["--order", "0"], "--order"),
    (S + ["--encoder-blocks", "0"], "--encoder-blocks"),
    (S + ["--classes", "a,b"], "--classes"),
    (S + ["--classes", ","], "--classes"),
    (S + ["--seed", BIG, "--num-images", "2"], "--seed"),
    # ---- sample: guidance, interval, shift, last step
    (S + ["--guidance", "nan"], "--guidance"),
    (S + ["--guidance", "inf"], "--guidance"),
    (S + ["--guidance", "-1"], "--guidance"),
    (S + ["--interval", "nan", "1"], "--interval MIN"),
    (S + ["--interval", "0.9", "0.3"], "MIN > MAX"),
    (S + ["--interval", "30", "100"], "--interval MIN must be a finite number <= 1"),  # percentages
    (S + ["--interval", "-1", "-0.5"], "--interval MAX must be a finite number >= 0"),  # guides no step
    (S + ["--interval", "0", "inf"], "--interval MAX"),
    (S + ["--shift", "nan"], "--shift"),
    (S + ["--shift", "0"], "--shift"),
    (S + ["--last-step", "nan"], "--last-step"),
    (S + ["--last-step", "0"], "--last-step"),
    (S + ["--last-step", "1.5"], "--last-step"),
    # ---- sample: schedules whose budget does not fit the step count
    (S + ["--schedule", "uniform:0"], "refresh_rate"),
    (S + ["--schedule", "uniform:11"], "uniform:R must be in 1..10"),
    (S + ["--schedule", "dp:0"], "dp:K must be in 1..10"),
    (S + ["--schedule", "dp:11"], "dp:K must be in 1..10"),
    (S + ["--schedule", "dp-ratio:1"], "dp-ratio:R"),
    (S + ["--schedule", "dp-ratio:-0.5"], "dp-ratio:R"),
    (S + ["--schedule", "dp-ratio:nan"], "dp-ratio:R"),
    (S + ["--schedule", "dp-tol:-1"], "dp-tol:X"),
    (S + ["--schedule", "dp-tol:nan"], "dp-tol:X"),
    (S + ["--schedule", "schedule10.json", "--steps", "12"], "--schedule schedule10.json is for 10 steps"),
    (S + ["--schedule", "calibration10.json", "--steps", "12"], "--schedule calibration10.json is for 10 steps"),
    (S + ["--schedule", "file.txt"], "--schedule file.txt is not valid JSON"),
    # ---- sample: settings from a published config are checked the same way, and named
    (
        ["sample", "--ckpt", "owner/name", "--out", "out", "--config", "published_steps0.json"],
        "--steps (num_steps from published_steps0.json)",
    ),
    (
        ["sample", "--ckpt", "owner/name", "--out", "out", "--config", "published_inverted.json"],
        "--interval (guidance_interval_min/max from published_inverted.json) 0.9 0.3: MIN > MAX",
    ),
    (["sample", "--ckpt", "owner/name", "--out", "out", "--config", "published_refresh0.json"], "state_refresh_rate"),
    (
        ["sample", "--ckpt", "owner/name", "--out", "out", "--config", "published_refresh_big.json"],
        "state_refresh_rate",
    ),
    # ---- sample: devices
    (S + ["--device", "foo"], "--device"),
    (S + ["--device", "cuda:x"], "--device"),
    (S + ["--device", "cuda"], "--device cuda: CUDA is not available"),
    (S + ["--device", "cuda:0"], "--device cuda:0: CUDA is not available"),
    # ---- sample: local paths that would be looked up on the model hub
    (S + ["--ckpt", "./runs/missing.ckpt"], "--ckpt ./runs/missing.ckpt: not found"),
    (S + ["--ckpt", "runs/missing.ckpt"], "--ckpt runs/missing.ckpt: not found"),
    (S + ["--ckpt", "runs/model"], "--ckpt runs/model: not found"),
    (S + ["--ckpt", "missing.safetensors"], "--ckpt missing.safetensors: not found"),
    (S + ["--ckpt", "weights.pt"], "--ckpt weights.pt: not found"),
    (S + ["--ckpt", "empty"], "--ckpt empty: the folder has no model.safetensors"),
    (S + ["--vae", "./sd-vae"], "--vae ./sd-vae: not found"),
    (S + ["--vae", "runs/sd-vae"], "--vae runs/sd-vae: not found"),
    (S + ["--vae", "vae_without_config"], "--vae vae_without_config: the folder has no config.json"),
    # ---- sample: outputs
    (S + ["--out", "file.txt"], "--out file.txt is a file"),
    (S + ["--out", "file.txt/out"], "--out file.txt/out"),
    # ---- sample: argparse's own usage errors
    (S + ["--steps", "ten"], "argument --steps: invalid int value"),
    (S + ["--sampler", "heun"], "argument --sampler: invalid choice"),
    (["sample", "--ckpt", "owner/name"], "the following arguments are required: --out"),
    (S + ["--bogus"], "unrecognized arguments: --bogus"),
    # ---- calibrate
    (C + ["--steps", "0"], "--steps"),
    (C + ["--calib-samples", "0"], "--calib-samples"),
    (C + ["--guidance", "nan"], "--guidance"),
    (C + ["--interval", "0.5", "0.2"], "MIN > MAX"),
    (C + ["--shift", "inf"], "--shift"),
    (C + ["--last-step", "nan"], "--last-step"),
    (C + ["--latent-size", "-8"], "--latent-size"),
    (C + ["--order", "5"], "--order"),
    (C + ["--seed", BIG], "--seed"),
    (C + ["--device", "cuda"], "--device"),
    (C + ["--ckpt", "runs/model"], "--ckpt runs/model: not found"),
    (C + ["--out", "taken.json"], "--out taken.json exists"),
    (C + ["--out", "taken.json"], "pass --force"),
    (C + ["--out", "runs"], "--out runs is a folder"),
    (C + ["--plot", "taken.png"], "--plot taken.png exists"),
    (C + ["--out", "taken.json", "--plot", "taken.json", "--force"], "--plot taken.json is the --out path"),
    (C + ["--out", "taken.json", "--force", "--plot", "file.txt/p.png"], "--plot file.txt/p.png"),
    (C + ["--out", "file.txt/cal.json"], "--out file.txt/cal.json"),
    (
        ["calibrate", "--ckpt", "owner/name", "--out", "cal.json", "--config", "published_steps0.json"],
        "num_steps from published_steps0.json",
    ),
    (C + ["--config", "published_inverted.json"], "MIN > MAX"),  # --steps given: the interval comes from it
    (C + ["--steps", "x"], "argument --steps: invalid int value"),
    # ---- train
    (["train", "--config", "train_nan_lr.json"], "lr (in train_nan_lr.json"),
    (T + ["device=foo"], "device (in train.json"),
    (T + ["device=cuda"], "CUDA is not available"),
    (T + ["init_from=runs/missing.ckpt"], "init_from (in train.json"),
    (T + ["data=missing_latents"], "data (in train.json"),
    (T + ["data=5"], "data (in train.json or a KEY=VALUE override) must be a string"),
    (T + ["image_folder=missing_images"], "image_folder (in train.json"),
    (T + ["out_dir=file.txt"], "out_dir (in train.json"),
    (T + ["weight_decay=-1"], "weight_decay (in train.json"),
    (T + ["eps=0"], "eps (in train.json"),
    (T + ["steps=0"], "steps must be a positive int"),
    (["train", "--config", "missing.yaml"], "config file not found"),
    (T + ["--bogus"], "unrecognized arguments: --bogus"),
    # ---- convert
    (["convert", "missing.ckpt", "out"], "IN missing.ckpt: checkpoint not found"),
    (["convert", "runs/missing", "out"], "IN runs/missing: checkpoint not found"),
    (["convert", "empty", "out.ckpt"], "IN empty: the folder has no model.safetensors"),
    (["convert", "weights.ckpt", "out", "--encoder-blocks", "0"], "--encoder-blocks"),
    (["convert", "weights.ckpt", "out", "--in-channels", "0"], "--in-channels"),
    (["convert", "weights.ckpt", "out", "--patch-size", "-2"], "--patch-size"),
    (["convert", "pretrained", "runs", "--force"], "OUT runs is a folder"),
    (["convert", "weights.ckpt", "file.txt", "--force"], "OUT file.txt is a file"),
    (["convert", "weights.ckpt", "runs"], "pass --force"),
    (["convert", "weights.ckpt", "file.txt/out"], "OUT file.txt/out"),
    (["convert", "weights.ckpt"], "the following arguments are required: OUT"),
    # ---- extract-latents
    (["extract-latents", "missing_images", "latents"], "IMAGE_FOLDER missing_images: image folder not found"),
    (["extract-latents", "images", "latents", "--resolution", "4"], "--resolution"),
    (["extract-latents", "images", "latents", "--batch-size", "0"], "--batch-size"),
    (["extract-latents", "images", "latents", "--shard-size", "0"], "--shard-size"),
    (["extract-latents", "images", "latents", "--vae", "./sd-vae"], "--vae ./sd-vae: not found"),
    (["extract-latents", "images", "latents", "--vae", "runs/sd-vae"], "--vae runs/sd-vae: not found"),
    (["extract-latents", "images", "latents", "--vae", "vae_without_config"], "the folder has no config.json"),
    (["extract-latents", "images", "latents", "--device", "cuda"], "--device"),
    (["extract-latents", "images", "file.txt"], "OUT file.txt is a file"),
    (["extract-latents", "images", "latents", "--dtype", "int8"], "argument --dtype: invalid choice"),
    # ---- demo
    (["demo", "--train-steps", "0"], "--train-steps"),
    (["demo", "--per-class", "0"], "--per-class"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--threads", "-2"], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", str(2**32)], "--seed"),
    (["demo", "--device", "foo"], "--device"),
    (["demo", "--device", "cuda"], "--device"),
    (["demo", "--out", "file.txt"], "--out file.txt is a file"),
    (["demo", "--out", "demo_run", "--train-steps", "100"], "--train-steps"),
    # ---- info
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "extra"], "unrecognized arguments: extra"),
]


def _main(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize(
    "argv, expected", CASES, ids=[f"{i}:{' '.join(argv[:1] + argv[-2:])}" for i, (argv, _) in enumerate(CASES)]
)
def test_bad_argument_is_one_line_before_any_work(workdir, capsys, argv, expected):
    before = _files(workdir)
    assert _main(list(argv)) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ddt-fast {argv[0]}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert _files(workdir) == before  # nothing written, nothing replaced


def test_every_subcommand_has_cases():
    assert {argv[0] for argv, _ in CASES} == set(cli.build_parser().commands)


def test_cuda_index_beyond_the_device_count(workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for argv in (S + ["--device", "cuda:2"], ["demo", "--device", "cuda:7"], T + ["device=cuda:2"]):
        assert _main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "2 CUDA device(s), cuda:0..cuda:1" in err, err


def test_user_errors_from_the_work_are_one_line(monkeypatch, capsys):
    """An OSError (permission denied, disk full) or a RuntimeError caused by one is a user error; any other
    RuntimeError is a bug and keeps its traceback."""

    def raises(error):
        def info():
            raise error

        return info

    monkeypatch.setattr(ddt_fast, "info", raises(PermissionError(13, "Permission denied", "/out/x.json")))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "ddt-fast info: error: [Errno 13] Permission denied: '/out/x.json'\n"
    wrapped = RuntimeError("could not load the VAE\nfrom the hub")
    wrapped.__cause__ = OSError("offline")
    monkeypatch.setattr(ddt_fast, "info", raises(wrapped))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "ddt-fast info: error: could not load the VAE from the hub\n"
    monkeypatch.setattr(ddt_fast, "info", raises(RuntimeError("an internal bug")))
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["info"])


def test_sample_force_is_passed_to_sample_to_folder(tmp_path, monkeypatch):
    calls = []

    def sample_to_folder(model, sampler, classes, seeds, out_dir, **kwargs):
        calls.append(kwargs["overwrite"])
        return os.path.join(out_dir, "latents.npz")

    monkeypatch.setattr(ddt_fast.models, "from_pretrained", lambda *a, **k: ddt_fast.models.create("DDT-tiny/2"))
    monkeypatch.setattr(ddt_fast.sampling, "sample_to_folder", sample_to_folder)
    argv = [
        "sample",
        "--ckpt",
        "owner/name",
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "2",
        "--latent-size",
        "8",
        "--num-images",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--interval",
        "-1",
        "2",
    ]  # every step guided
    assert cli.main(argv) == 0 and cli.main(argv + ["--force"]) == 0
    assert calls == [False, True]


def test_latent_size_must_fit_the_patch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ddt_fast.models, "from_pretrained", lambda *a, **k: ddt_fast.models.create("DDT-tiny/2"))
    monkeypatch.setattr(ddt_fast.sampling, "sample_to_folder", _refuse("sample_to_folder"))
    assert (
        cli.main(
            ["sample", "--ckpt", "owner/name", "--out", str(tmp_path / "o"), "--latent-size", "7", "--device", "cpu"]
        )
        == 2
    )
    assert "--latent-size 7 is not a multiple of the model's patch size 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the samplers' constructors

NAN, INF = float("nan"), float("inf")
SAMPLER_CASES = [
    (dict(guidance=NAN), "guidance must be finite"),
    (dict(guidance=INF), "guidance must be finite"),
    (dict(guidance=-INF), "guidance must be finite"),
    (dict(guidance=-0.5), "guidance must be >= 0"),
    (dict(guidance="2"), "guidance must be a number"),
    (dict(guidance_interval_min=NAN), "guidance_interval_min must be finite"),
    (dict(guidance_interval_max=INF), "guidance_interval_max must be finite"),
    (dict(guidance_interval_min=0.9, guidance_interval_max=0.3), "guidance_interval_min 0.9 > guidance_interval_max"),
    (dict(guidance_interval_min=30.0, guidance_interval_max=100.0), "guidance_interval_min must be <= 1"),
    (dict(guidance_interval_min=-1.0, guidance_interval_max=-0.5), "guidance_interval_max must be >= 0"),
    (dict(timeshift=NAN), "timeshift must be finite"),
    (dict(timeshift=INF), "timeshift must be finite"),
    (dict(timeshift=0.0), "timeshift must be > 0"),
    (dict(last_step=NAN), "last_step must be finite"),
    (dict(num_steps=1, last_step=NAN), "last_step must be finite"),
    (dict(last_step=0.0), "last_step must be in (0, 1]"),
    (dict(num_steps=0), "num_steps must be an int >= 1"),
    (dict(num_steps=True), "num_steps must be an int >= 1"),
    (dict(num_steps=4.0), "num_steps must be an int >= 1"),
    (dict(state_refresh_rate=0), "state_refresh_rate must be an int >= 1"),
]


@pytest.mark.parametrize("cls", [EulerSampler, AdamsSampler])
@pytest.mark.parametrize("kwargs, message", SAMPLER_CASES, ids=[str(k) for k, _ in SAMPLER_CASES])
def test_sampler_rejects(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**dict(dict(num_steps=10), **kwargs))


@pytest.mark.parametrize("order", [0, 4, 2.0, True])
def test_adams_order(order):
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        AdamsSampler(10, order=order)


def test_sampler_edges_still_accepted():
    """The valid edges keep their published meaning: guidance 0 (unconditional) and 1 (none), an empty or
    full interval (strict: a negative MIN takes in t = 0, a MAX above 1 runs to the end), a last step of 1, a
    one-step sampler, numpy scalars."""
    for kwargs in (
        dict(guidance=0.0),
        dict(guidance=1.0),
        dict(guidance_interval_min=0.5, guidance_interval_max=0.5),
        dict(guidance_interval_min=0.0, guidance_interval_max=1.0),
        dict(last_step=1.0),
        dict(guidance_interval_min=-1.0, guidance_interval_max=2.0),
        dict(num_steps=1, last_step=0.04),
        dict(guidance=np.float32(2.0), timeshift=np.float64(3.0)),
        dict(timeshift=1e-3),
    ):
        s = EulerSampler(**dict(dict(num_steps=10), **kwargs))
        assert all(math.isfinite(float(t)) for t in s.timesteps)
    assert EulerSampler(4, guidance_interval_min=-1.0, guidance_interval_max=2.0).is_guided(0)  # t = 0
    assert not EulerSampler(4, guidance_interval_min=0.0, guidance_interval_max=1.0).is_guided(0)
    s = EulerSampler(10, 2, 1, 0, 1, last_step=0.04)  # ints
    assert (s.guidance, s.timeshift, s.guidance_interval_min, s.guidance_interval_max) == (2.0, 1.0, 0.0, 1.0)
    assert all(type(v) is float for v in (s.guidance, s.timeshift, s.last_step))
