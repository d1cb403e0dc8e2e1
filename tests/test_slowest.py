"""slowest.py: the expected slowest of independent normal steps, and the slack that shortens it."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dbs_hvd import slowest
from dbs_hvd.plan import Bounds, equalise_step_times
from dbs_hvd.slowest import expected_slowest, normal_cdf, normal_quantile, slack

means = st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6)


def test_normal_cdf_matches_erf():
    z = np.linspace(-8, 8, 4001)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
    assert np.max(np.abs(normal_cdf(z) - exact)) < 2e-7


@given(st.floats(1e-6, 1 - 1e-6))
def test_normal_quantile_inverts_the_cdf(p):
    assert normal_cdf(normal_quantile(np.array([p])))[0] == pytest.approx(p, abs=1e-6)


def test_normal_quantile_keeps_the_shape_and_stops_at_the_tail():
    p = np.array([[0.0, 1e-300], [0.5, 1.0]])
    z = normal_quantile(p)
    assert z.shape == (2, 2)
    np.testing.assert_allclose(z, [[-slowest.TAIL, -slowest.TAIL], [0.0, slowest.TAIL]], atol=1e-9)


@given(means)
def test_steady_ranks_take_the_slowest_mean(values):
    mean = np.array(values)
    assert expected_slowest(mean, np.zeros(len(mean))) == max(values)


@settings(max_examples=50, deadline=None)
@given(means, st.data())
def test_varying_ranks_lengthen_the_expected_step_by_at_most_their_spread(values, data):
    mean = np.array(values)
    spread = np.array(data.draw(st.lists(st.floats(0.0, 0.3), min_size=len(mean), max_size=len(mean))))
    value = expected_slowest(mean, spread)
    # E[max] >= max E; and E[max] - max(m) <= E[sum of positive parts] = sum(sigma) / sqrt(2 pi)
    assert value >= max(values) - 1e-9
    assert value <= max(values) + spread.sum() / math.sqrt(2 * math.pi) + 1e-5  # the grid's error


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10**6))
def test_expected_slowest_matches_sampling(ranks, seed):
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.5, 1.0, ranks)
    spread = rng.uniform(0.0, 0.2, ranks) * (rng.random(ranks) < 0.7)
    draws = rng.normal(mean, spread, (200_000, ranks)).max(axis=1)
    assert expected_slowest(mean, spread) == pytest.approx(draws.mean(), abs=4 * draws.std() / 400 + 1e-4)


def test_a_larger_mean_never_shortens_the_expected_step():
    spread = np.array([0.1, 0.2, 0.0])
    values = [expected_slowest(np.array([0.5, m, 0.6]), spread) for m in np.linspace(0.2, 1.0, 41)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_many_ranks_integrate_the_likeliest_alike(monkeypatch):
    rng = np.random.default_rng(0)
    mean, spread = rng.uniform(0.9, 1.0, 1000), rng.uniform(0.01, 0.05, 1000)
    full = expected_slowest(mean, spread)
    monkeypatch.setattr(slowest, "MOST_RANKS", 500)
    assert expected_slowest(mean, spread) == pytest.approx(full, rel=1e-3)


@given(st.integers(2, 64), st.floats(1e-4, 1e-2), st.floats(0.0, 0.1))
def test_ranks_of_equal_cost_and_spread_get_equal_slack(ranks, per_sample, spread):
    out = slack(np.full(ranks, per_sample), np.full(ranks, spread))
    assert np.allclose(out, out[0])


def test_steady_ranks_get_no_slack_and_a_single_rank_none():
    assert np.all(slack(np.array([1.0, 3.0]), np.zeros(2)) == 0)
    assert np.all(slack(np.array([1.0]), np.array([0.5])) == 0)


@pytest.mark.parametrize("per_sample,spread", [((0.4, 2.5), 5.0), ((0.4, 3.6), 5.0), ((1.0, 1.5), 4.0),
                                               ((0.5, 2.0), 8.0)])
def test_slack_for_one_varying_rank_finds_the_shortest_expected_step(per_sample, spread):
    """Two ranks, the second varying: the slacked plan is the best integer plan, or within
    0.5% of its expected step (a plan is integer; the slack is exact only before rounding)."""
    c, a, s = np.array(per_sample), np.array([0.0, 7.5]), np.array([0.0, spread])
    batch = 64
    best = min(expected_slowest(a + c * np.array([batch - b, b]), s) for b in range(1, batch))
    plan = equalise_step_times(a + slack(c, s), c, batch, Bounds())
    means_only = equalise_step_times(a, c, batch, Bounds())
    assert expected_slowest(a + c * plan, s) <= 1.005 * best
    assert plan[1] <= means_only[1]  # the varying rank is given fewer samples, never more
