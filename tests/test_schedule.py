"""The statistic DP solver (ddt_fast.schedule.solve, the dp_schedule_solve op)
against brute force and the NumPy reference, its error messages, and the
Schedule type."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddt_fast import _extension
from ddt_fast.schedule import DPResult, Schedule, every_step, from_steps, solve, uniform
from ddt_fast.schedule.reference import brute_force, schedule_cost, solve_published_style, solve_reference

HAS_CPU_OP = _extension.has_kernel("dp_schedule_solve", "CPU")
HAS_CUDA_OP = _extension.has_kernel("dp_schedule_solve", "CUDA")
needs_op = pytest.mark.skipif(not HAS_CPU_OP, reason="ddt_fast._C is not built (no dp_schedule_solve kernel)")
# The compiled kernel when there is one; the reference backend is checked too.
BACKENDS = ["fused", "reference"] if HAS_CPU_OP else ["reference"]


# Similarity matrices -------------------------------------------------------


def random_sim(rng, n):
    return rng.uniform(-1.0, 1.0, size=(n, n))


def drifting_sim(rng, n, dim=16, drift=0.15):
    """Cosine similarities of unit vectors that drift slowly across steps."""
    v = rng.standard_normal(dim)
    rows = []
    for _ in range(n):
        v = v + drift * rng.standard_normal(dim)
        rows.append(v / np.linalg.norm(v))
    x = np.stack(rows)
    return x @ x.T


def eighths_sim(rng, n):
    """Multiples of 1/8: every sum the DP forms is exact, so exact ties are common."""
    return rng.integers(0, 9, size=(n, n)) / 8.0


SIM_KINDS = {
    "random": random_sim,
    "drifting": drifting_sim,
    "eighths": eighths_sim,
    "ones": lambda rng, n: np.ones((n, n)),
}


# Against brute force --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", range(1, 13))
def test_matches_brute_force_for_every_budget(n, backend):
    rng = np.random.default_rng(100 + n)
    for kind, make in SIM_KINDS.items():
        sim = make(rng, n)
        res = solve(sim, n, backend=backend)
        for k in range(1, n + 1):
            bf = brute_force(sim, k)
            got = res.cost[k - 1].item()
            assert got == pytest.approx(bf.cost, rel=1e-12, abs=1e-12), (kind, k)
            # Exact arithmetic ("eighths", "ones") makes the tie rule comparable.
            if bf.num_optimal == 1 or kind in ("eighths", "ones"):
                assert res.steps(k) == bf.steps, (kind, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_ties_go_to_the_earliest_steps(backend):
    n = 9
    res = solve(torch.ones(n, n), n, backend=backend)
    for k in range(1, n + 1):
        assert res.steps(k) == list(range(k))
        assert res.cost[k - 1].item() == 0.0


def test_hand_worked_case():
    # e = 1 - sim; row = step that reuses, column = step that ran the encoder.
    e = np.array([[0.0, 9.0, 9.0], [0.5, 0.0, 9.0], [1.0, 0.25, 0.0]])
    res = solve(1.0 - e, 3)
    assert res.curve() == [(1, 1.5), (2, 0.25), (3, 0.0)]
    assert [res.steps(k) for k in (1, 2, 3)] == [[0], [0, 1], [0, 1, 2]]
    assert res.steps_table.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2]]


# Against the NumPy reference -----------------------------------------------


def _check_against_reference(sim_t, k_max, res):
    c_ref, s_ref = solve_reference(sim_t.double().cpu().numpy(), k_max)
    np.testing.assert_allclose(res.cost.cpu().numpy(), c_ref, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(res.steps_table.cpu().numpy(), s_ref)


@needs_op
@pytest.mark.parametrize("n", [1, 2, 17, 250, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched", [False, True])
def test_matches_reference(n, dtype, batched):
    rng = np.random.default_rng(n)
    b = 3 if batched else 1
    kinds = [drifting_sim, random_sim, eighths_sim]
    sims = np.stack([kinds[i % 3](rng, n) for i in range(b)])
    sim = torch.from_numpy(sims).to(dtype)
    if not batched:
        sim = sim[0]
    k_max = n if n <= 250 else 120
    res = solve(sim, k_max)
    assert res.batched == batched and res.num_steps == n and res.k_max == k_max
    assert res.cost.dtype == torch.float64 and res.steps_table.dtype == torch.int32
    assert res.cost.shape == ((b, k_max) if batched else (k_max,))
    assert res.steps_table.shape == ((b, k_max, k_max) if batched else (k_max, k_max))
    _check_against_reference(sim, k_max, res)


@needs_op
def test_non_contiguous_input():
    rng = np.random.default_rng(5)
    big = torch.from_numpy(rng.uniform(0, 1, size=(4, 90, 90)))
    for sim in (
        big[::2, ::2, 1::2],  # strided in every dimension
        big.transpose(1, 2),  # transposed
        big[1].t(),  # 2-D transposed
        big.float()[:, 3:48, 3:48],
    ):  # offset float32 view
        assert not sim.is_contiguous()
        res = solve(sim, 20)
        _check_against_reference(sim, 20, res)


@needs_op
def test_numpy_input_matches_tensor_input():
    rng = np.random.default_rng(6)
    sim = drifting_sim(rng, 40)
    a, b = solve(sim, 10), solve(torch.from_numpy(sim), 10)
    assert torch.equal(a.cost, b.cost) and torch.equal(a.steps_table, b.steps_table)
    c = solve(sim[::-1, ::-1], 10)  # negative strides are copied, not rejected
    _check_against_reference(torch.from_numpy(sim[::-1, ::-1].copy()), 10, c)


@needs_op
def test_fused_and_reference_backends_agree_bitwise():
    rng = np.random.default_rng(8)
    sim = torch.from_numpy(np.stack([drifting_sim(rng, 64) for _ in range(5)]))
    a, b = solve(sim, 64, backend="fused"), solve(sim, 64, backend="reference")
    assert torch.equal(a.cost, b.cost) and torch.equal(a.steps_table, b.steps_table)


def test_published_style_agrees_with_reference():
    rng = np.random.default_rng(9)
    for n, k in [(1, 1), (7, 3), (40, 12), (60, 60)]:
        sim = drifting_sim(rng, n)
        cost, steps = solve_published_style(sim, k)
        c_ref, s_ref = solve_reference(sim, k)
        assert cost == c_ref[k - 1]
        assert steps == s_ref[k - 1, :k].tolist()


def test_reported_cost_is_the_cost_of_the_reported_schedule():
    rng = np.random.default_rng(10)
    sim = drifting_sim(rng, 80)
    res = solve(sim, 30)
    for k in (1, 2, 7, 30):
        assert res.cost[k - 1].item() == schedule_cost(sim, res.steps(k))


def test_empty_batch():
    res = solve(torch.zeros(0, 5, 5), 3)
    assert res.cost.shape == (0, 3) and res.steps_table.shape == (0, 3, 3)
    with pytest.raises(IndexError, match="problem 0 is out of range for a batch of 0"):
        res.steps(1)


@pytest.mark.slow
def test_fallback_when_the_extension_is_missing():
    code = (
        "import sys; sys.modules['ddt_fast._C'] = None\n"
        "import numpy as np, ddt_fast\n"
        "from ddt_fast import _extension\n"
        "from ddt_fast.schedule import solve\n"
        "assert not _extension.available()\n"
        "r = solve(np.ones((6, 6)), 3)\n"
        "print(r.steps(3), r.cost.tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 2] [0.0, 0.0, 0.0]"


# Bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sim, k_max, exc, match",
    [
        (torch.ones(4), 1, ValueError, r"\[N, N\] or \[B, N, N\], got a 1-D tensor of shape \(4,\)"),
        (torch.ones(2, 2, 2, 2), 1, ValueError, r"got a 4-D tensor"),
        (torch.ones(3, 4), 1, ValueError, r"square in its last two dimensions, got shape \(3, 4\)"),
        (torch.ones(2, 5, 4), 1, ValueError, r"square"),
        (torch.ones(0, 0), 1, ValueError, r"at least one step \(N >= 1\)"),
        (torch.ones(4, 4), 0, ValueError, r"k_max must be in 1..N = 1..4, got 0"),
        (torch.ones(4, 4), 5, ValueError, r"k_max must be in 1..N = 1..4, got 5"),
        (torch.ones(4, 4), 2.0, TypeError, r"k_max must be an int, got float"),
        (torch.ones(4, 4), True, TypeError, r"k_max must be an int, got a bool"),
        (
            torch.ones(4, 4, dtype=torch.int64),
            2,
            TypeError,
            r"float32 or float64, got torch.int64; convert it with sim.double\(\)",
        ),
        (torch.ones(4, 4, dtype=torch.float16), 2, TypeError, r"got torch.float16; convert"),
        (
            np.ones((4, 4), dtype=np.float16),
            2,
            TypeError,
            r"got numpy float16; convert it with sim.astype\(np.float64\)",
        ),
        (np.ones((4, 4), dtype=np.int32), 2, TypeError, r"got numpy int32"),
        ([[1.0]], 1, TypeError, r"torch.Tensor or numpy.ndarray, got list"),
    ],
)
def test_bad_input_messages(sim, k_max, exc, match):
    with pytest.raises(exc, match=match):
        solve(sim, k_max)


def test_non_finite_input_names_the_problem_and_the_fix():
    sim = torch.ones(3, 5, 5)
    sim[2, 1, 4] = float("nan")
    with pytest.raises(
        ValueError, match=r"sim\[2\] \(problem 2\) has a non-finite similarity nan at \[1, 4\].*nan_to_num"
    ):
        solve(sim, 2)
    one = np.ones((5, 5))
    one[3, 0] = -np.inf
    with pytest.raises(
        ValueError, match=r"^sim has a non-finite similarity -inf at \[3, 0\]; the DP needs finite values"
    ):
        solve(one, 2)


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        solve(torch.ones(3, 3), 1, backend="fast")


@needs_op
@pytest.mark.parametrize(
    "sim, k_max, match",
    [
        (torch.ones(4, 4), 1, r"sim must be 3-D \[B, N, N\], got 2-D"),
        (torch.ones(1, 4, 3), 1, r"square in its last two dimensions"),
        (torch.ones(1, 0, 0), 1, r"N >= 1"),
        (torch.ones(1, 4, 4), 5, r"k_max must be in 1..N = 1..4, got 5"),
        (torch.ones(1, 4, 4), 0, r"k_max must be in 1..N = 1..4, got 0"),
        (torch.ones(1, 4, 4, dtype=torch.float16), 2, r"float32 or float64, got Half"),
    ],
)
def test_op_argument_checks(sim, k_max, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ddt_fast.dp_schedule_solve(sim, k_max)


# DPResult ---------------------------------------------------------------------


def test_result_accessors():
    rng = np.random.default_rng(11)
    sims = np.stack([drifting_sim(rng, 30) for _ in range(2)])
    res = solve(sims, 12)
    assert isinstance(res, DPResult) and res.batched and res.batch_size == 2
    c_ref, s_ref = solve_reference(sims, 12)
    for p in range(2):
        curve = res.curve(p)
        assert [k for k, _ in curve] == list(range(1, 13))
        assert [c for _, c in curve] == c_ref[p].tolist()
        assert res.steps(5, problem=p) == s_ref[p, 4, :5].tolist()
        sched = res.schedule(5, problem=p)
        assert sched.kind == "dp" and sched.budget == 5 and sched.num_steps == 30
        assert sched.cost == c_ref[p, 4] and sched.meta == {"k_max": 12, "problem": p}
        tol = float(c_ref[p, 6])
        assert res.smallest_budget(tol, problem=p) == int(np.argmax(c_ref[p] <= tol)) + 1
    assert "batch=2" in repr(res)


def test_result_errors():
    res = solve(np.ones((6, 6)) * 0.5, 3)
    with pytest.raises(IndexError, match=r"budget k=4 is out of range: this result holds budgets 1..3"):
        res.steps(4)
    with pytest.raises(IndexError, match=r"budget k=0"):
        res.schedule(0)
    with pytest.raises(IndexError, match=r"problem must be 0 for an unbatched result, got 1"):
        res.curve(1)
    with pytest.raises(ValueError, match=r"no budget up to k_max=3 reaches cost <= 0.1 .*larger k_max \(at most N=6\)"):
        res.smallest_budget(0.1)
    with pytest.raises(TypeError, match="tol must be a number"):
        res.smallest_budget("1")
    batch = solve(np.ones((2, 4, 4)), 2)
    with pytest.raises(IndexError, match=r"problem 2 is out of range for a batch of 2"):
        batch.steps(1, problem=2)


# torch.library checks -----------------------------------------------------------


@needs_op
@pytest.mark.parametrize(
    "shape, k_max, dtype",
    [
        ((1, 1, 1), 1, torch.float64),
        ((2, 9, 9), 4, torch.float64),
        ((3, 33, 33), 33, torch.float32),
    ],
)
def test_opcheck_cpu(shape, k_max, dtype):
    sim = torch.rand(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.ddt_fast.dp_schedule_solve.default, (sim, k_max))


@needs_op
def test_fake_tensor_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.ddt_fast.dp_schedule_solve
    with FakeTensorMode():
        cost, steps = op(torch.empty(3, 10, 10, dtype=torch.float32), 4)
        assert cost.shape == (3, 4) and cost.dtype == torch.float64
        assert steps.shape == (3, 4, 4) and steps.dtype == torch.int32
        with pytest.raises(Exception, match=r"k_max must be in 1..N = 1..3, got 4"):  # the kernel's message
            op(torch.empty(1, 3, 3), 4)
    sim = torch.rand(2, 12, 12, dtype=torch.float64)
    cost, steps = torch.compile(lambda t: op(t, 5), fullgraph=True)(sim)
    c_ref, s_ref = solve_reference(sim.numpy(), 5)
    np.testing.assert_array_equal(cost.numpy(), c_ref)
    np.testing.assert_array_equal(steps.numpy(), s_ref)


# CUDA ------------------------------------------------------------------------------

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_cuda_op = pytest.mark.skipif(not HAS_CUDA_OP, reason="ddt_fast._C was built without the CUDA kernel")


@cuda
@needs_gpu
@needs_cuda_op
@pytest.mark.parametrize(
    "n, batch, k_max",
    [
        (1, 1, 1),
        (2, 3, 2),
        (17, 1, 17),
        (31, 64, 31),
        (250, 1, 50),
        (250, 64, 250),
        (300, 5, 300),
        (600, 2, 40),
        (3100, 1, 6),  # > 256 threads' worth of i; rows over 48 KiB
    ],
)
def test_cuda_matches_cpu(n, batch, k_max):
    rng = np.random.default_rng(n + batch)
    sims = torch.from_numpy(np.stack([drifting_sim(rng, n, drift=0.05) for _ in range(batch)]))
    c_cpu, s_cpu = torch.ops.ddt_fast.dp_schedule_solve(sims, k_max)
    c_gpu, s_gpu = torch.ops.ddt_fast.dp_schedule_solve(sims.cuda(), k_max)
    assert c_gpu.is_cuda and s_gpu.is_cuda
    # Same adds in the same order on both devices: equal bits.
    assert torch.equal(c_gpu.cpu(), c_cpu)
    assert torch.equal(s_gpu.cpu(), s_cpu)


@cuda
@needs_gpu
@needs_cuda_op
@pytest.mark.slow
def test_cuda_rows_in_global_memory():
    n = 14600  # two rows of n+1 doubles exceed the largest shared-memory opt-in (227 KiB)
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(1, n, n, dtype=torch.float64, generator=g)
    c_cpu, s_cpu = torch.ops.ddt_fast.dp_schedule_solve(sim, 2)
    c_gpu, s_gpu = torch.ops.ddt_fast.dp_schedule_solve(sim.cuda(), 2)
    assert torch.equal(c_gpu.cpu(), c_cpu) and torch.equal(s_gpu.cpu(), s_cpu)


@cuda
@needs_gpu
@needs_cuda_op
def test_cuda_solve_and_noncontiguous():
    rng = np.random.default_rng(12)
    base = torch.from_numpy(np.stack([drifting_sim(rng, 80) for _ in range(4)])).cuda()
    sim = base.transpose(1, 2)[::2].float()
    res = solve(sim, 30)
    assert res.cost.is_cuda
    _check_against_reference(sim, 30, res)


@cuda
@needs_gpu
@needs_cuda_op
def test_opcheck_cuda():
    sim = torch.rand(3, 40, 40, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.ddt_fast.dp_schedule_solve.default, (sim, 12))


# Schedule ---------------------------------------------------------------------------


def test_uniform_and_every_step():
    u = uniform(10, 3)
    assert u.steps == (0, 3, 6, 9) and u.kind == "uniform" and u.meta == {"refresh_rate": 3}
    assert [u.recompute(i) for i in range(10)] == [i % 3 == 0 for i in range(10)]
    assert uniform(250, 1).steps == tuple(range(250))
    assert uniform(5, 7).steps == (0,)
    e = every_step(4)
    assert e.steps == (0, 1, 2, 3) and e.kind == "every" and e.budget == 4
    assert from_steps([0, 2], 5).kind == "explicit"


def test_schedule_membership():
    s = from_steps([0, 4, 7], 10)
    assert 4 in s and 5 not in s and 10 not in s and "a" not in s and True not in s
    assert s.recompute(7) and not s.recompute(8)
    with pytest.raises(IndexError, match="step 10 is out of range for a 10-step schedule"):
        s.recompute(10)


@pytest.mark.parametrize(
    "steps, n, exc, match",
    [
        ([], 5, ValueError, "at least one step"),
        ([1, 2], 5, ValueError, "must start at step 0"),
        ([0, 3, 2], 5, ValueError, "strictly increasing: unsorted steps 3 then 2"),
        ([0, 2, 2], 5, ValueError, "strictly increasing: duplicate steps 2 then 2"),
        ([0, 5], 5, ValueError, r"step 5 is out of range for num_steps=5 \(steps are 0..4\)"),
        ([0, 1.5], 5, TypeError, "every step must be an int, got float"),
        ([0], 0, ValueError, "num_steps must be >= 1"),
    ],
)
def test_schedule_validation(steps, n, exc, match):
    with pytest.raises(exc, match=match):
        from_steps(steps, n)


def test_schedule_other_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        Schedule((0,), 3, kind="random")
    with pytest.raises(ValueError, match="cost must be finite"):
        Schedule((0,), 3, cost=float("inf"))
    with pytest.raises(ValueError, match="refresh_rate must be >= 1"):
        uniform(10, 0)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        every_step(0)


def test_schedule_is_frozen_and_normalised():
    s = Schedule([0, np.int64(3)], np.int32(8), kind="dp", cost=np.float64(1.5), meta={"tol": 0.1})
    assert s.steps == (0, 3) and type(s.steps[1]) is int and type(s.num_steps) is int
    with pytest.raises(AttributeError):
        s.steps = (0,)
    assert s == Schedule((0, 3), 8, kind="dp", cost=1.5, meta={"tol": 0.1})


def test_schedule_json_round_trip():
    s = Schedule((0, 2, 9), 12, kind="dp", cost=0.125, meta={"k_max": 5, "tol": 0.5})
    d = json.loads(s.to_json())
    assert d["steps"] == [0, 2, 9] and d["budget"] == 3 and d["format"] == "ddt_fast.schedule"
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_dict(s.to_dict()) == s
    u = uniform(250, 5)
    assert Schedule.from_json(u.to_json(indent=2)) == u


def test_schedule_from_dict_errors():
    good = uniform(6, 2).to_dict()
    with pytest.raises(ValueError, match="says budget 4 but lists 3 steps"):
        Schedule.from_dict({**good, "budget": 4})
    with pytest.raises(ValueError, match="missing num_steps"):
        Schedule.from_dict({"steps": [0]})
    with pytest.raises(ValueError, match="not a ddt_fast schedule"):
        Schedule.from_dict({**good, "format": "other"})
    with pytest.raises(ValueError, match="unsupported schedule version 2"):
        Schedule.from_dict({**good, "version": 2})
    with pytest.raises(ValueError, match="schedule JSON is malformed"):
        Schedule.from_json("{steps")


def test_schedule_save_load(tmp_path):
    path = tmp_path / "sched.json"
    s = solve(np.ones((20, 20)) * 0.9, 6).schedule(4)
    s.save(path)
    assert Schedule.load(path) == s
    s2 = uniform(20, 4)
    with pytest.raises(FileExistsError, match="nothing is overwritten without asking"):
        s2.save(str(path))
    assert Schedule.load(path) == s
    s2.save(str(path), overwrite=True)  # replaces the existing file
    assert Schedule.load(str(path)) == s2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched.json"]  # no temporary left behind


def test_schedule_save_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "sched.json"
    uniform(10, 2).save(path)
    before = path.read_text()
    bad = Schedule((0,), 10, meta={"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save(path, overwrite=True)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched.json"]


def test_schedule_load_errors(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"steps": [0, 3, 1], "num_steps": 5}')
    with pytest.raises(ValueError, match=r"broken.json: not a valid schedule: .*unsorted"):
        Schedule.load(path)
    with pytest.raises(FileNotFoundError):
        Schedule.load(tmp_path / "missing.json")
