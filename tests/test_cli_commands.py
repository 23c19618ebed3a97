"""The `ddt-fast` subcommands added for the whole workflow: train (YAML config
+ overrides), convert (round trip), extract-latents, calibrate's plot,
published YAML configs for sample / calibrate, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_vae

from ddt_fast import models, sampling
from ddt_fast.cli import main
from ddt_fast.config_files import ConfigError, apply_overrides, parse_value, published_settings
from ddt_fast.models.checkpoint import read_state_dict
from ddt_fast.training.checkpointing import lightning_state_dict

yaml = pytest.importorskip("yaml")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# an architecture that is no published preset: the split must come from the config
ARCH = dict(
    in_channels=4, patch_size=2, num_groups=2, hidden_size=32, num_blocks=3, num_encoder_blocks=2, num_classes=10
)


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "ddt_fast", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


def _published_yaml(
    path,
    denoiser=None,
    sampler_class="src.diffusion.stateful_flow_matching.adam_sampling.AdamLMSampler",
    sampler_args=None,
):
    """A config in the published Lightning CLI layout (field names as in the published configs)."""
    sampler = dict(
        num_steps=6,
        guidance=3.0,
        state_refresh_rate=2,
        guidance_interval_min=0.1,
        guidance_interval_max=0.9,
        timeshift=1.5,
        last_step=0.1,
        order=2,
        scheduler="src.diffusion.flow_matching.scheduling.LinearScheduler",
        w_scheduler="src.diffusion.flow_matching.scheduling.LinearScheduler",
        guidance_fn="src.diffusion.base.guidance.simple_guidance_fn",
        step_fn="src.diffusion.flow_matching.sampling.ode_step_fn",
    )
    sampler.update(sampler_args or {})
    config = {
        "seed_everything": True,
        "trainer": {"precision": "bf16-mixed", "max_steps": 4000000},
        "model": {
            "vae": {
                "class_path": "src.models.vae.LatentVAE",
                "init_args": {"precompute": True, "weight_path": "stabilityai/sd-vae-ft-ema"},
            },
            "denoiser": {
                "class_path": "src.models.denoiser.decoupled_improved_dit.DDT",
                "init_args": dict(ARCH, **(denoiser or {})),
            },
            "conditioner": {"class_path": "src.models.conditioner.LabelConditioner", "init_args": {"null_class": 10}},
            "diffusion_sampler": {"class_path": sampler_class, "init_args": sampler},
            "ema_tracker": {"class_path": "src.callbacks.simple_ema.SimpleEMA", "init_args": {"decay": 0.9999}},
        },
        "data": {"train_dataset": "imagenet256", "num_classes": 10, "latent_shape": [4, 8, 8]},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def published_ckpt(tmp_path_factory):
    """A published-layout Lightning checkpoint of ARCH with no hyper-parameters (so no recorded split)."""
    torch.manual_seed(0)
    m = models.DDT(**ARCH)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = m.state_dict()
    path = str(tmp_path_factory.mktemp("pub") / "last.ckpt")
    torch.save({"state_dict": lightning_state_dict(sd, sd)}, path)
    return path


# ---------------------------------------------------------------------------
# published YAML configs


def test_sample_reads_the_published_yaml(published_ckpt, tmp_path):
    cfg = _published_yaml(tmp_path / "ddt.yaml")
    out = str(tmp_path / "out")
    # without the config the split cannot be known
    assert main(["sample", "--ckpt", published_ckpt, "--quiet", "--out", out, "--device", "cpu"]) == 2
    assert (
        main(
            [
                "sample",
                "--ckpt",
                published_ckpt,
                "--config",
                cfg,
                "--quiet",
                "--num-images",
                "3",
                "--classes",
                "1,2,7",
                "--out",
                out,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    s = manifest["sampler"]
    assert (s["num_steps"], s["guidance"], s["timeshift"], s["last_step"]) == (6, 3.0, 1.5, 0.1)
    assert (s["guidance_interval_min"], s["guidance_interval_max"], s["order"]) == (0.1, 0.9, 2)
    assert manifest["schedule"]["kind"] == "uniform" and manifest["schedule"]["steps"] == [0, 2, 4]
    # the same numbers as the Python API with the settings written out by hand
    model = models.load_checkpoint(published_ckpt, num_encoder_blocks=2)
    sampler = sampling.AdamsSampler(
        num_steps=6,
        guidance=3.0,
        timeshift=1.5,
        guidance_interval_min=0.1,
        guidance_interval_max=0.9,
        state_refresh_rate=2,
        last_step=0.1,
        order=2,
    )
    expect = sampling.sample(model, [1, 2, 7], seeds=[0, 1, 2], sampler=sampler, latent_size=8)
    with np.load(os.path.join(out, "latents.npz")) as z:
        np.testing.assert_allclose(z["arr_0"], expect.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_command_line_overrides_the_published_yaml(published_ckpt, tmp_path, capsys):
    cfg = _published_yaml(tmp_path / "ddt.yaml")
    cal = str(tmp_path / "cal.json")
    first = [
        "calibrate",
        "--ckpt",
        published_ckpt,
        "--config",
        cfg,
        "--steps",
        "5",
        "--calib-samples",
        "2",
        "--quiet",
        "--out",
        cal,
        "--device",
        "cpu",
    ]
    assert main(first) == 0
    text = open(cal).read()
    os.utime(cal, (1, 1))
    assert main(first) == 0  # the same settings and weights: reused, not recomputed
    assert "up to date" in capsys.readouterr().out
    assert open(cal).read() == text and os.stat(cal).st_mtime == 1
    saved = json.load(open(cal))
    assert saved["settings"]["num_steps"] == 5 and saved["settings"]["guidance"] == 3.0
    assert saved["settings"]["latent_size"] == 8
    png = str(tmp_path / "cal.png")  # the plot, by default beside the JSON
    from PIL import Image

    assert Image.open(png).size[0] > 100
    os.remove(png)
    other = ["calibrate", "--ckpt", published_ckpt, "--config", cfg, "--steps", "4", "--calib-samples", "1"]
    other += ["--quiet", "--out", cal, "--plot", "none", "--device", "cpu"]
    assert main(other) == 2  # cal.json: other settings
    err = capsys.readouterr().err.strip()
    assert "num_steps: 5 -> 4" in err and "--force" in err and len(err.splitlines()) == 1
    assert main([*other, "--force"]) == 0
    assert json.load(open(cal))["settings"]["num_steps"] == 4
    assert not os.path.exists(png)


def test_published_yaml_errors_name_the_setting(published_ckpt, tmp_path, capsys):
    common = ["sample", "--ckpt", published_ckpt, "--quiet", "--out", str(tmp_path / "o"), "--device", "cpu"]
    bad = _published_yaml(tmp_path / "a.yaml", denoiser={"hidden_dim": 32})
    assert main([*common, "--config", bad]) == 2
    assert "model.denoiser.init_args has unknown setting(s) ['hidden_dim']" in capsys.readouterr().err
    bad = _published_yaml(tmp_path / "b.yaml", sampler_args={"num_stepz": 3})
    assert main([*common, "--config", bad]) == 2
    assert "['num_stepz']" in capsys.readouterr().err
    bad = _published_yaml(tmp_path / "c.yaml", sampler_class="src.diffusion.ddpm.DDIMSampler")
    assert main([*common, "--config", bad]) == 2
    assert "'DDIMSampler' is not a sampler ddt_fast runs" in capsys.readouterr().err
    wrong = _published_yaml(tmp_path / "d.yaml", denoiser={"hidden_size": 64})
    assert main([*common, "--config", wrong]) == 2
    assert "'hidden_size': (64, 32)" in capsys.readouterr().err
    assert main([*common, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a config of the published DDT code"):
        published_settings({"model": "DDT-XL/2"})


def test_published_config_euler_defaults():
    got = published_settings(
        {
            "model": {
                "denoiser": {"init_args": {"num_encoder_blocks": 22}},
                "diffusion_sampler": {"class_path": "x.EulerSampler", "init_args": {"num_steps": 250, "guidance": 2.0}},
            }
        }
    )
    assert got == {
        "model": {"num_encoder_blocks": 22},
        "sampler": "euler",
        "options": {"steps": 250, "guidance": 2.0},
        "latent_size": None,
    }


# ---------------------------------------------------------------------------
# schedules and other bad input


def test_schedule_syntax_errors_before_any_work(published_ckpt, tmp_path, capsys):
    common = ["sample", "--ckpt", str(tmp_path / "does-not-matter"), "--quiet", "--out", str(tmp_path / "o")]
    for spec, message in (
        ("foo:3", "unknown schedule"),
        ("uniform:x", "uniform takes an integer"),
        ("dp:half", "dp takes an integer"),
        ("dp-tol:", "unknown schedule"),
        (str(tmp_path / "nope.json"), "unknown schedule (and no such file)"),
    ):
        assert main([*common, "--schedule", spec]) == 2
        assert message in capsys.readouterr().err, spec


def test_overrides_parse_as_yaml():
    assert parse_value("100") == 100 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[0.9, 0.99]") == [0.9, 0.99] and parse_value("runs/x") == "runs/x"
    assert parse_value("-2E+4") == -2e4 and parse_value("1_000") == 1000 and parse_value("7") == 7
    assert parse_value("null") is None and parse_value("DDT-XL/2") == "DDT-XL/2"
    cfg = apply_overrides({"model_args": {"in_channels": 1}}, ["model_args.hidden_size=64", "steps=5"])
    assert cfg == {"model_args": {"in_channels": 1, "hidden_size": 64}, "steps": 5}
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


# ---------------------------------------------------------------------------
# train, convert


TINY_TRAIN = dict(
    model="DDT-tiny/2",
    model_args=dict(
        in_channels=1, num_classes=10, hidden_size=32, num_groups=2, num_blocks=2, num_encoder_blocks=1, patch_size=2
    ),
    data="digits",
    global_batch=8,
    steps=3,
    ckpt_every=100,
    lr=1e-3,
    device="cpu",
    tensorboard=False,
    log_every=1,
)


def _write_yaml(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`ddt-fast train` in a subprocess on a tiny digits config, with command-line overrides."""
    root = tmp_path_factory.mktemp("train")
    cfg = _write_yaml(root / "tiny.yaml", dict(TINY_TRAIN, out_dir=str(root / "run")))
    res = _run("train", "--config", cfg, "steps=4", "model_args.hidden_size=16", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "to step 4" in res.stdout
    return root


@pytest.mark.slow
def test_train_writes_the_run_with_the_overrides(trained):
    run = trained / "run"
    saved = json.load(open(run / "config.json"))
    assert saved["steps"] == 4 and saved["model_args"]["hidden_size"] == 16 and saved["global_batch"] == 8
    assert os.path.exists(run / "checkpoints" / "step_00000004.ckpt")
    lines = [json.loads(ln) for ln in open(run / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4] and all(np.isfinite(ln["loss"]) for ln in lines)


def test_train_config_errors(tmp_path, capsys):
    def run(data, *overrides):
        assert main(["train", "--config", _write_yaml(tmp_path / "c.yaml", data), *overrides]) == 2
        return capsys.readouterr().err

    base = dict(TINY_TRAIN, out_dir=str(tmp_path / "run"))
    assert "unknown training setting(s) ['stepz']" in run(dict(base, stepz=3))
    assert "unknown training setting(s) ['lr_max']" in run(base, "lr_max=3")
    assert "unknown DDT preset 'DDT-XXL/2'" in run(dict(base, model="DDT-XXL/2"))
    assert "unknown DDT argument(s) ['depth']" in run(base, "model_args.depth=3")
    assert "global_batch must be a positive int" in run(base, "global_batch=0")
    assert "config of the published Lightning code" in run({"model": {"denoiser": {"init_args": {}}}})
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def _weights(path, **kw):
    sd, _ = read_state_dict(path, **kw)
    return sd


def _torchrun(nproc, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "ddt_fast",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_train_under_torchrun_matches_one_process_and_resumes(tmp_path, strategy):
    """`torchrun --nproc_per_node 2 ddt-fast train`: two gloo processes with the same global batch give
    the weights of one process accumulating two micro-batches, and a second launch resumes the run."""
    from ddt_fast.training.distributed import fsdp_available

    if strategy == "fsdp" and not fsdp_available():
        pytest.skip(f"this PyTorch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    base = dict(TINY_TRAIN, seed=5, ckpt_every=2, keep_last=0, ema_decay=0.5, grad_clip=1.0, progress=False)
    cfg = _write_yaml(tmp_path / "tiny.yaml", base)
    two = str(tmp_path / "two")
    res = _torchrun(2, "train", "--config", cfg, f"out_dir={two}", f"strategy={strategy}", "steps=3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("to step 3") == 1  # rank 0 reports
    res = _torchrun(2, "train", "--config", cfg, f"out_dir={two}", f"strategy={strategy}", "steps=5", "resume=true")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one = str(tmp_path / "one")
    res = _run("train", "--config", cfg, f"out_dir={one}", "grad_accum=2", "steps=5", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = sorted(os.listdir(os.path.join(two, "checkpoints")))
    names = ["step_00000002.ckpt", "step_00000003.ckpt", "step_00000004.ckpt", "step_00000005.ckpt"]
    assert ckpts == sorted(names + [n + ".sha256" for n in names])  # each with its checksum sidecar
    for ema in (True, False):
        a = _weights(os.path.join(one, "checkpoints", "step_00000005.ckpt"), ema=ema)
        b = _weights(os.path.join(two, "checkpoints", "step_00000005.ckpt"), ema=ema)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5, msg=k)
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(two, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5]  # one writer (rank 0), the resumed run appends


@pytest.mark.slow
def test_convert_round_trip(trained, tmp_path, capsys):
    ckpt = str(trained / "run" / "checkpoints" / "step_00000004.ckpt")
    ema, raw = _weights(ckpt), _weights(ckpt, ema=False)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # 4 steps: EMA and training weights differ
    folder, folder_raw = str(tmp_path / "ema"), str(tmp_path / "raw")
    assert main(["convert", ckpt, folder]) == 0
    assert main(["convert", ckpt, folder_raw, "--no-ema"]) == 0
    for path, expect in ((folder, ema), (folder_raw, raw)):
        got = _weights(path)
        assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)
    back = str(tmp_path / "back.ckpt")
    assert main(["convert", folder, back]) == 0
    obj = torch.load(back, weights_only=True)
    assert {k.split(".", 1)[0] for k in obj["state_dict"]} == {"denoiser", "ema_denoiser"}
    assert obj["hyper_parameters"]["model_config"]["hidden_size"] == 16
    again = str(tmp_path / "again")
    assert main(["convert", back, again]) == 0
    assert json.load(open(os.path.join(again, "config.json")))["num_encoder_blocks"] == 1
    got = _weights(again)
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    leftovers = [f for d in (folder, again, str(tmp_path)) for f in os.listdir(d) if f.endswith(".tmp")]
    assert leftovers == []
    capsys.readouterr()
    assert main(["convert", ckpt, folder]) == 2  # nothing overwritten without asking
    assert "pass --force" in capsys.readouterr().err
    assert main(["convert", ckpt, folder, "--force"]) == 0
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# extract-latents


def test_extract_latents_command(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from PIL import Image

    vae = tiny_vae(0)
    vae.save_pretrained(str(tmp_path / "vae"))
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "images" / cls)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(
                tmp_path / "images" / cls / f"{i}.png"
            )
    out = str(tmp_path / "latents")
    assert (
        main(
            [
                "extract-latents",
                str(tmp_path / "images"),
                out,
                "--vae",
                str(tmp_path / "vae"),
                "--resolution",
                "16",
                "--flip",
                "--shard-size",
                "3",
                "--batch-size",
                "2",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["num_items"] == 8 and index["classes"] == ["a", "b"] and len(index["shards"]) == 3
    assert "8 latents" in capsys.readouterr().out
    assert (
        main(
            [
                "extract-latents",
                str(tmp_path / "nothing"),
                str(tmp_path / "l2"),
                "--vae",
                str(tmp_path / "vae"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "image folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# --help


def test_every_subcommand_has_help(capsys):
    for command in ("info", "sample", "calibrate", "train", "convert", "extract-latents", "demo"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"usage: ddt-fast {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_console_entry_point_help_in_a_subprocess():
    res = _run("--help", timeout=120)
    assert res.returncode == 0, res.stderr
    for command in ("info", "sample", "calibrate", "train", "convert", "extract-latents", "demo"):
        assert command in res.stdout
