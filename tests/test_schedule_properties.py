"""Properties of the statistic DP that hold for every input, checked with
hypothesis on small random matrices."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ddt_fast.schedule import solve
from ddt_fast.schedule.reference import schedule_cost, solve_reference

SETTINGS = settings(max_examples=150, deadline=None)

values = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@st.composite
def similarity(draw, max_n=24):
    """A similarity-like matrix: entries in [-1, 1], ones on the diagonal."""
    n = draw(st.integers(1, max_n))
    sim = draw(arrays(np.float64, (n, n), elements=values))
    np.fill_diagonal(sim, 1.0)
    return sim


@st.composite
def any_matrix(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    return draw(arrays(np.float64, (n, n), elements=st.floats(-1e3, 1e3)))


@SETTINGS
@given(similarity())
def test_cost_never_increases_with_the_budget(sim):
    # With e >= 0 and e[i][i] = 0, splitting a run's last step off costs nothing.
    cost = solve(sim, sim.shape[0]).cost.numpy()
    assert np.all(np.diff(cost) <= 0), cost


@SETTINGS
@given(similarity())
def test_zero_cost_when_every_step_runs_the_encoder(sim):
    n = sim.shape[0]
    res = solve(sim, n)
    assert res.cost[n - 1].item() == 0.0
    assert res.steps(n) == list(range(n))


@SETTINGS
@given(any_matrix(), st.data())
def test_schedules_are_well_formed(sim, data):
    n = sim.shape[0]
    k_max = data.draw(st.integers(1, n))
    res = solve(sim, k_max)
    table = res.steps_table.numpy()
    for k in range(1, k_max + 1):
        steps = res.steps(k)
        assert len(steps) == k and steps[0] == 0 and steps[-1] < n
        assert all(a < b for a, b in zip(steps, steps[1:]))
        assert np.all(table[k - 1, k:] == -1)
        # The reported cost is that schedule's cost, computed from the definition.
        assert res.cost[k - 1].item() == schedule_cost(sim, steps)


@SETTINGS
@given(any_matrix(), st.data())
def test_no_schedule_beats_the_dp(sim, data):
    n = sim.shape[0]
    k = data.draw(st.integers(1, n))
    rest = data.draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1, unique=True)) if n > 1 else []
    other = [0] + sorted(rest)
    best = solve(sim, k).cost[k - 1].item()
    assert best <= schedule_cost(sim, other)


@pytest.mark.slow
@SETTINGS
@given(st.integers(1, 4), st.integers(1, 12), st.data())
def test_batch_equals_the_reference(batch, n, data):
    sims = data.draw(arrays(np.float64, (batch, n, n), elements=st.floats(-1e3, 1e3)))
    res = solve(sims, n)
    cost, steps = solve_reference(sims, n)
    np.testing.assert_allclose(res.cost.numpy(), cost, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(res.steps_table.numpy(), steps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@SETTINGS
@given(data=st.data())
def test_float32_input_is_solved_in_float64(dtype, data):
    sim = data.draw(arrays(dtype, (9, 9), elements=st.floats(-1, 1, width=32)))
    res = solve(sim, 9)
    cost, steps = solve_reference(sim.astype(np.float64), 9)
    np.testing.assert_allclose(res.cost.numpy(), cost, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(res.steps_table.numpy(), steps)
