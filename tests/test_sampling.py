"""Samplers, schedules in sampling, calibration."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model

from ddt_fast import sampling
from ddt_fast.sampling import AdamsSampler, EulerSampler, time_grid


class ToyNet:
    """net(x, t, y, s) -> (v, s) with v a known function of t: v = a + b t for
    the conditional class, and 0 for the null class (so guidance scales it)."""

    num_classes = 10

    def __init__(self, a=1.0, b=0.0, c=0.0):
        self.a, self.b, self.c = a, b, c
        self.calls = []

    def __call__(self, x, t, y, s=None):
        self.calls.append((x.shape[0], s is None))
        v = (self.a + self.b * t + self.c * t * t).view(-1, 1, 1, 1).expand_as(x).clone()
        v[y == self.num_classes] = 0.0
        return v, (torch.zeros(x.shape[0], 1, 1) if s is None else s)


def run(sampler, net, B=2):
    noise = torch.zeros(B, 1, 2, 2)
    cond = torch.arange(B)
    return sampler(net, noise, cond, torch.full_like(cond, 10))


def test_time_grid_and_shift_hand_values():
    g = time_grid(5, 0.04)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.24, 0.48, 0.72, 0.96, 1.0]))
    g3 = time_grid(3, 0.5, timeshift=3.0)  # t = 0, 0.25, 0.5, 1 -> t / (t + 3(1 - t))
    torch.testing.assert_close(g3, torch.tensor([0.0, 0.25 / (0.25 + 2.25), 0.5 / 2.0, 1.0]))
    assert EulerSampler(4).last_step == 0.25  # published default: 1 / num_steps


def test_euler_exact_for_constant_velocity_and_matches_hand_sum():
    x = run(EulerSampler(7, guidance=1.0), ToyNet(a=1.5))
    torch.testing.assert_close(x, torch.full_like(x, 1.5))  # sum of dt is 1
    g = time_grid(7, 1 / 7).double()
    expected = sum(2 * g[i] * (g[i + 1] - g[i]) for i in range(7))
    x = run(EulerSampler(7, guidance=1.0), ToyNet(a=0.0, b=2.0))
    torch.testing.assert_close(x, torch.full_like(x, float(expected)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [2, 3])
def test_adams_exact_for_polynomials_after_its_start(order):
    # AB-k integrates polynomials of degree k-1 exactly once k velocities exist;
    # the first k-1 steps use lower orders, whose error we add back by hand.
    b, c = 2.0, (3.0 if order == 3 else 0.0)
    net = ToyNet(a=0.5, b=b, c=c)
    s = AdamsSampler(9, guidance=1.0, order=order)
    x = run(s, net)
    g = s.timesteps.double()
    v = lambda t: 0.5 + b * t + c * t * t
    exact = 0.5 + b / 2 + c / 3  # integral over [0, 1]
    t0, t1, t2 = g[0], g[1], g[2]
    err = 0.0
    # step 0 is Euler
    err += (0.5 * (t1 - t0) + b * (t1**2 - t0**2) / 2 + c * (t1**3 - t0**3) / 3) - v(t0) * (t1 - t0)
    if order == 3:  # step 1 is AB2: exact for the linear part, misses the quadratic's curvature
        w0, w1 = s.weights[1]
        err += (0.5 * (t2 - t1) + b * (t2**2 - t1**2) / 2 + c * (t2**3 - t1**3) / 3) - (
            float(w0) * v(t0) + float(w1) * v(t1)
        ) * (t2 - t1)
    torch.testing.assert_close(x.double(), torch.full_like(x.double(), float(exact - err)), atol=2e-5, rtol=0)


def test_adams_order_1_is_euler():
    net = ToyNet(a=0.3, b=1.0)
    torch.testing.assert_close(run(AdamsSampler(6, order=1), net), run(EulerSampler(6), net))
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        AdamsSampler(6, order=4)


def test_guidance_interval_is_strict():
    # grid 0, .25, .5, .75, 1 (last_step .25): guidance (0.25, 0.75) applies at t = 0.5 only
    s = EulerSampler(4, guidance=3.0, guidance_interval_min=0.25, guidance_interval_max=0.75, last_step=0.25)
    assert [s.is_guided(i) for i in range(4)] == [False, False, True, False]
    x = run(s, ToyNet(a=1.0))
    # v = 1 on unguided steps, 3 * 1 on the guided one; dt = 0.25 each
    torch.testing.assert_close(x, torch.full_like(x, 0.25 * (1 + 1 + 3 + 1)))


def test_reference_mode_runs_both_halves_and_drops_state_on_schedule():
    net = ToyNet()
    run(EulerSampler(6, mode="reference", state_refresh_rate=3), net, B=2)
    assert [c[0] for c in net.calls] == [4] * 6  # [uncond; cond] every step
    assert [c[1] for c in net.calls] == [True, False, False, True, False, False]


_tiny = tiny_model


def _sample(m, **kw):
    noise = sampling.make_noise([1, 2, 3], (4, 8, 8))
    cond = torch.tensor([1, 5, 9])
    s = EulerSampler(
        kw.pop("steps", 8), kw.pop("guidance", 2.0), 1.0, kw.pop("gmin", 0.3), kw.pop("gmax", 1.0), last_step=0.04, **kw
    )
    return s(m, noise, cond, torch.full_like(cond, 10))


@pytest.mark.slow
def test_fast_equals_reference_when_guidance_covers_every_step_and_no_sharing():
    m = _tiny()
    ref = _sample(m, mode="reference", gmin=-1.0, gmax=2.0)
    fast = _sample(m, mode="fast", gmin=-1.0, gmax=2.0, cache_modulation=False)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_fast_with_and_without_modulation_cache_identical():
    m = _tiny()
    for schedule in ("every", [0, 3, 4, 7], "uniform:2"):
        a = _sample(m, schedule=schedule, cache_modulation=True)
        b = _sample(m, schedule=schedule, cache_modulation=False)
        assert torch.equal(a, b), schedule


def test_fast_mode_close_to_reference_with_interval_and_sharing():
    m = _tiny()
    ref = _sample(m, mode="reference", schedule=[0, 4])
    fast = _sample(m, mode="fast", schedule=[0, 4])
    # Differences: v = v_c exactly outside the interval (reference: u + 1 * (c - u)),
    # and the unconditional state of the unguided recompute step 0 is computed at
    # the first guided step instead.
    assert ((fast - ref).norm() / ref.norm()) < 0.05


def test_fast_mode_deferred_unconditional_state_is_computed_once_per_window():
    m = _tiny()
    calls = []
    orig = m.encode

    def spy(x, t, y, mask=None):
        calls.append((x.shape[0], float(t[0]), bool((y == 10).all())))
        return orig(x, t, y, mask)

    m.encode = spy
    _sample(m, schedule=[0, 5], steps=8)  # grid t: 0, .137, .274, .411 ... guided from t > 0.3 (step 3)
    uncond_only = [c for c in calls if c[2]]
    assert len(uncond_only) == 1 and uncond_only[0][0] == 3  # computed at step 3, for the reused window
    assert calls[0][0] == 3 and not calls[0][2]  # step 0: conditional half only


def test_same_seed_same_image_whatever_the_batch():
    m = _tiny()
    s = EulerSampler(4, 2.0, 1.0, 0.3, 1.0, last_step=0.04)
    big = sampling.sample(m, [1, 2, 3, 4], seeds=[10, 11, 12, 13], sampler=s, latent_size=8)
    small = sampling.sample(m, [3], seeds=[12], sampler=s, latent_size=8)
    torch.testing.assert_close(small[0], big[2], atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(7)
    s2 = EulerSampler(4, 2.0, 1.0, 0.3, 1.0, last_step=0.04, generator=g)
    a = sampling.sample(m, [1, 2], sampler=s2, latent_size=8)
    s2.generator.manual_seed(7)
    torch.testing.assert_close(sampling.sample(m, [1, 2], sampler=s2, latent_size=8), a)


def test_calibration_statistic_matches_direct_computation_and_k_equals_n():
    m = _tiny()
    s = EulerSampler(6, 2.0, 1.0, 0.3, 1.0, last_step=0.04)
    cal = sampling.calibrate(m, s, num_samples=2, seed=3, latent_size=8, state_dtype=torch.float32)
    # direct: keep every state in float64 and compute the statistic afterwards
    states = []
    template = EulerSampler(6, 2.0, 1.0, 0.3, 1.0, last_step=0.04, mode="reference")
    labels = torch.tensor(cal.settings["classes"])
    noise = sampling.make_noise([3 * 1_000_003 + k for k in range(2)], (4, 8, 8))
    template(m, noise, labels, torch.full_like(labels, 10), on_step=lambda i, st: states.append(st.double()))
    unit = [torch.nn.functional.normalize(st, dim=-1) for st in states]
    direct = np.array([[float((a * b).sum(-1).mean()) for b in unit] for a in unit])
    np.testing.assert_allclose(cal.similarity, direct, atol=1e-6)
    assert cal.schedule(6).steps == tuple(range(6))
    assert cal.curve()[-1][1] == pytest.approx(0.0, abs=1e-12)
    bf16 = sampling.calibrate(m, s, num_samples=2, seed=3, latent_size=8)
    np.testing.assert_allclose(bf16.similarity, direct, atol=1e-2)


def test_calibration_file_round_trip_and_schedule_selection(tmp_path):
    m = _tiny()
    s = EulerSampler(10, 2.0, 1.0, 0.3, 1.0, last_step=0.04)
    cal = sampling.calibrate(m, s, num_samples=2, latent_size=8)
    path = tmp_path / "cal.json"
    cal.save(path)
    loaded = sampling.Calibration.load(path)
    np.testing.assert_array_equal(loaded.similarity, cal.similarity)
    assert sampling.load_schedule(path, budget=3) == cal.schedule(3)
    assert sampling.load_schedule(path).budget == 2  # default: sharing ratio 0.8
    sched = cal.schedule(4)
    sched.save(tmp_path / "k4.json")
    s4 = EulerSampler(10, 2.0, 1.0, 0.3, 1.0, last_step=0.04, schedule=str(tmp_path / "k4.json"))
    assert s4.schedule.steps == sched.steps
    out = s4(m, sampling.make_noise([0], (4, 8, 8)), torch.tensor([1]), torch.tensor([10]))
    assert torch.isfinite(out).all()


def test_bad_inputs_have_clear_errors(tmp_path):
    m = _tiny()
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        EulerSampler(10, guidance=-1.0)
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        EulerSampler(0)
    with pytest.raises(ValueError, match="schedule is for 5 steps but the sampler takes 10"):
        EulerSampler(10, schedule=sampling.every_step(5))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EulerSampler(10, schedule=str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither a schedule nor a calibration file"):
        EulerSampler(10, schedule=str(tmp_path / "other.json"))
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        EulerSampler(10, schedule=str(tmp_path / "missing.json"))
    s = EulerSampler(3)
    noise = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"class ids in \[1, 11\]; valid ids are 0..9"):
        s(m, noise, torch.tensor([1, 11]), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="integer tensor of 2 class ids"):
        s(m, noise, torch.tensor([1.0, 2.0]), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="mode must be one of"):
        EulerSampler(3, mode="turbo")


def test_published_constructor_arguments_accepted():
    s = EulerSampler(
        num_steps=250,
        guidance=2.0,
        timeshift=1.0,
        guidance_interval_min=0.3,
        guidance_interval_max=1.0,
        state_refresh_rate=1,
        last_step=0.04,
        scheduler=object(),
        w_scheduler=object(),
        guidance_fn=sampling.simple_guidance,
    )
    assert s.timesteps.shape == (251,) and s.schedule.budget == 250
    a = sampling.AdamLMSampler(num_steps=10, order=2, state_refresh_rate=2)
    assert a.schedule.steps == (0, 2, 4, 6, 8)


@pytest.mark.slow
def test_bf16_autocast_sampling_close_to_fp32():
    m = _tiny()
    ref = _sample(m)
    out = _sample(m, autocast=torch.bfloat16)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < 5e-2
    with pytest.raises(ValueError, match="autocast must be"):
        EulerSampler(4, autocast=torch.float64)
