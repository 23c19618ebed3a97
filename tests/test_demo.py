"""`ddt-fast demo`: its quality measures against independent formulas, and
the quick demo end to end in a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddt_fast.demo import DemoSettings, DigitsClassifier, frechet_distance, real_digits, to_uint8

pytest.importorskip("sklearn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 1)) * 2.0 + 1.0
    b = rng.normal(size=(3000, 1)) * 0.5 - 1.0
    # 1-D Gaussians: (m_a - m_b)^2 + (s_a - s_b)^2, with the sample moments
    expect = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    x = rng.normal(size=(500, 6))
    assert abs(frechet_distance(x, x)) < 1e-8
    # commuting (diagonal) covariances: sum over dims of (dm^2 + (s_a - s_b)^2)
    d_a, d_b = np.diag([1.0, 2.0, 3.0]), np.diag([2.0, 0.5, 3.0])
    a3 = rng.normal(size=(20000, 3)) @ d_a
    b3 = rng.normal(size=(20000, 3)) @ d_b + np.array([1.0, 0.0, -2.0])
    s_a, s_b = np.sqrt(np.var(a3, 0, ddof=1)), np.sqrt(np.var(b3, 0, ddof=1))
    cross = np.corrcoef(np.c_[a3, b3].T)  # near-diagonal: the closed form is approximate
    assert np.abs(cross[:3, :3] - np.eye(3)).max() < 0.05
    approx = np.sum((a3.mean(0) - b3.mean(0)) ** 2) + np.sum((s_a - s_b) ** 2)
    assert frechet_distance(a3, b3) == pytest.approx(approx, rel=0.02)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    expect = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, b[:, :4])


def test_classifier_is_accurate_and_its_features_separate_real_from_noise():
    clf = DigitsClassifier(seed=0)
    assert clf.held_out_accuracy >= 0.95
    x, y = real_digits()
    assert x.shape == (1797, 8, 8) and x.min() == -1.0 and x.max() == 1.0
    assert clf.accuracy(clf.x_test.reshape(-1, 8, 8), clf.y_test) == pytest.approx(clf.held_out_accuracy)
    feats = clf.features(x)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(500, 8, 8)).astype(np.float32)
    held = frechet_distance(clf.features(clf.x_test), feats)
    assert frechet_distance(clf.features(noise), feats) > 10 * held


def test_to_uint8_dark_ink_on_white():
    img = to_uint8(np.array([[[-1.0, 1.0] * 4] * 8]), scale=2)
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.uint8
    assert img[0, 0, 0, 0] == 255 and img[0, 0, 2, 0] == 0  # background white, ink black


def test_settings_budgets():
    assert DemoSettings().budgets() == [20, 10, 8, 5]
    with pytest.raises(ValueError, match="multiple of 40"):
        DemoSettings(num_steps=30).budgets()


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(
        [sys.executable, "-m", "ddt_fast", "demo", "--quick", "--quiet", "--out", out],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(os.path.join(out, "metrics.json")))
    names = [r["schedule"] for r in m["schedules"]]
    assert names == ["every"] + [f"{kind} K={k}" for k in (20, 10, 8, 5) for kind in ("uniform", "dp")]
    for r in m["schedules"]:
        for key in ("wall_s", "speedup", "accuracy", "fd", "mse_vs_every", "dp_cost"):
            assert np.isfinite(r[key]), (r["schedule"], key)
        assert len(r["steps"]) == r["K"] and r["steps"][0] == 0
        assert os.path.getsize(os.path.join(out, r["grid"])) > 0
        assert r["schedule"] in res.stdout  # the printed table
    every = m["schedules"][0]
    assert every["mse_vs_every"] == 0.0 and every["dp_cost"] == 0.0 and every["K"] == 40
    assert every["accuracy"] > 0.3  # chance is 0.1
    assert m["classifier"]["held_out_accuracy"] >= 0.95
    # the DP schedule is optimal for its statistic: never costlier than uniform at the same budget
    by = {r["schedule"]: r for r in m["schedules"]}
    for k in (20, 10, 8, 5):
        assert by[f"dp K={k}"]["dp_cost"] <= by[f"uniform K={k}"]["dp_cost"] + 1e-9
    assert m["training"]["steps"] == 250
    for f in ("cost_vs_budget.png", "calibration.json", "model/config.json", "model/model.safetensors"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert "DP vs uniform at equal K" in res.stdout
