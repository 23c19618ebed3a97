import json
import os

import numpy as np
import pytest
import torch

from ddt_fast import models
from ddt_fast.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = models.create("DDT-tiny/2")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    m.save_pretrained(path)
    return path


COMMON = ["--steps", "5", "--latent-size", "8", "--quiet", "--calib-samples", "2", "--device", "cpu"]


@pytest.mark.slow
def test_sample_latents_with_dp_schedule(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "sample",
                "--ckpt",
                ckpt,
                *COMMON,
                "--num-images",
                "3",
                "--classes",
                "1,2",
                "--schedule",
                "dp:2",
                "--out",
                out,
            ]
        )
        == 0
    )
    with np.load(os.path.join(out, "latents.npz")) as z:
        assert z["arr_0"].shape == (3, 4, 8, 8)
        assert list(z["classes"]) == [1, 2, 1]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["schedule"]["kind"] == "dp" and len(manifest["schedule"]["steps"]) == 2
    assert "2/5 encoder steps" in capsys.readouterr().out


def test_calibrate_then_sample_with_the_file(ckpt, tmp_path):
    cal = str(tmp_path / "cal.json")
    assert main(["calibrate", "--ckpt", ckpt, *COMMON, "--out", cal]) == 0
    assert json.load(open(cal))["format"] == "ddt_fast.calibration"
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "sample",
                "--ckpt",
                ckpt,
                *COMMON,
                "--num-images",
                "2",
                "--schedule",
                cal,
                "--out",
                out,
                "--sampler",
                "adams",
                "--order",
                "2",
            ]
        )
        == 0
    )
    assert os.path.exists(os.path.join(out, "latents.npz"))


def test_cli_errors_are_one_line_and_exit_2(ckpt, tmp_path, capsys):
    assert main(["sample", "--ckpt", ckpt, *COMMON, "--classes", "3,99", "--out", str(tmp_path)]) == 2
    assert "--classes [99] out of range: class ids are 0..9" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "missing"), *COMMON, "--out", str(tmp_path)]) == 2
    assert "neither an existing path nor a hub id" in capsys.readouterr().err
    assert main(["sample", "--ckpt", ckpt, *COMMON, "--schedule", "uniform:0", "--out", str(tmp_path)]) == 2
    assert "refresh_rate" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_under_torchrun_two_cpu_processes(ckpt, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "dist")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ddt_fast",
        "sample",
        "--ckpt",
        ckpt,
        *COMMON,
        "--num-images",
        "5",
        "--batch-size",
        "2",
        "--classes",
        "1,2,3",
        "--out",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    single = str(tmp_path / "single")
    assert (
        main(
            [
                "sample",
                "--ckpt",
                ckpt,
                *COMMON,
                "--num-images",
                "5",
                "--batch-size",
                "5",
                "--classes",
                "1,2,3",
                "--out",
                single,
            ]
        )
        == 0
    )
    with np.load(os.path.join(out, "latents.npz")) as a, np.load(os.path.join(single, "latents.npz")) as b:
        np.testing.assert_allclose(a["arr_0"], b["arr_0"], atol=1e-5, rtol=1e-5)
    assert json.load(open(os.path.join(out, "manifest.json")))["world_size"] == 2
