"""The expected slowest rank of a synchronous step, where ranks' step times vary.

Every rank's step ends with the same allreduce, so each step lasts as long as
that step's slowest rank. Where a rank's compute varies from step to step (a
CPU quota freezes it for part of each period, a noisy neighbour takes its
core at random moments), the expected step is longer than the slowest mean:
``E[max_i T_i] >= max_i E[T_i]``. Plans that equalise the means leave the
varying rank the last one about half the time; moving work off it, onto ranks
whose steps are steady, shortens the expected step as long as a sample costs
the steady rank less than it saves on the varying one.

Each rank's step time is modelled as independent and normal, with the mean of
the policy's cost model and the spread measured from step to step
(``plan.WindowStats.compute_spread``). ``expected_slowest`` integrates the
distribution of the maximum (the predicted step a plan is judged by);
``slack`` says how far below the others each rank's mean should sit to
shorten it.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

#: Points of the grid the expected maximum is integrated on.
GRID_POINTS = 257
#: Standard deviations beyond which a rank's step is taken as certain not to fall.
TAIL = 6.0
#: The most varying ranks integrated: those likeliest to be the slowest. Beyond
#: a thousand ranks the rest change the expectation little, and integrating
#: them all would cost rank 0 a noticeable part of a rebalance.
MOST_RANKS = 1024

_STANDARD_NORMAL = NormalDist()
_TAIL_PROBABILITY = _STANDARD_NORMAL.cdf(-TAIL)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """The standard normal distribution function, elementwise (absolute error below 1e-7).

    numpy has no ``erf``; this is Abramowitz and Stegun's 7.1.26 approximation.

    Examples:
        >>> [round(float(v), 4) for v in normal_cdf(np.array([-1.0, 0.0, 1.96]))]
        [0.1587, 0.5, 0.975]
    """
    x = np.minimum(np.abs(z), 40.0) / np.sqrt(2.0)  # beyond 40, the tail is 0 in doubles
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.where(z < 0, -erf, erf))


def expected_slowest(mean: np.ndarray, spread: np.ndarray) -> float:
    """The expected maximum of independent normal step times, one per rank.

    Args:
        mean: each rank's mean step time.
        spread: each rank's standard deviation (0: a steady rank).

    Returns:
        ``E[max_i T_i]`` in the units of ``mean``; ``max(mean)`` when no rank
        varies. A rank whose spread is too narrow for the integration grid
        counts as steady, and of more than ``MOST_RANKS`` varying ranks, those
        with the highest mean plus spread count.

    Examples:
        >>> round(expected_slowest(np.array([1.0, 1.0]), np.array([0.0, 0.3])), 3)
        1.12
        >>> expected_slowest(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
        2.0
    """
    mean = np.asarray(mean, dtype=float)
    spread = np.asarray(spread, dtype=float)
    varies = spread > 0
    while True:
        steady = float(mean[~varies].max()) if (~varies).any() else -np.inf
        if not varies.any():
            return steady
        # Below ``low`` some varying rank is surely slower, or the steady maximum
        # holds the step: E[max] = low + the integral of P(max > t) above it.
        low = max(steady, float(np.max(mean[varies] - TAIL * spread[varies])))
        high = float(np.max(mean[varies] + TAIL * spread[varies]))
        if high <= low:
            return low
        # A rank whose spread is under two of the grid's steps would be a jump
        # the grid cannot resolve; it counts as steady (E[max] changes by less
        # than its spread), and the grid is laid again over the others.
        narrow = varies & (spread < 2.0 * (high - low) / (GRID_POINTS - 1))
        if not narrow.any():
            break
        varies &= ~narrow
    m, s = mean[varies], spread[varies]
    if len(m) > MOST_RANKS:
        likeliest = np.argpartition(-(m + s), MOST_RANKS)[:MOST_RANKS]
        m, s = m[likeliest], s[likeliest]
    t = np.linspace(low, high, GRID_POINTS)
    above = 1.0 - np.prod(normal_cdf((t[:, None] - m) / s), axis=1)
    step = (high - low) / (GRID_POINTS - 1)
    return low + step * float(above.sum() - 0.5 * (above[0] + above[-1]))  # trapezoid rule


def normal_quantile(p: np.ndarray) -> np.ndarray:
    """The standard normal quantile (the inverse of ``normal_cdf``), elementwise.

    Each element comes from the standard library's ``NormalDist.inv_cdf``, a
    closed form accurate to double precision: planning runs on rank 0 while
    every rank waits, and a closed form costs a small fraction of solving
    ``normal_cdf(z) = p`` numerically. Probabilities beyond ``TAIL`` standard
    deviations (0 and 1 included) give ``-TAIL`` and ``TAIL``.

    Examples:
        >>> [round(float(v), 3) for v in normal_quantile(np.array([0.025, 0.975]))]
        [-1.96, 1.96]
    """
    p = np.clip(np.asarray(p, dtype=float), _TAIL_PROBABILITY, 1.0 - _TAIL_PROBABILITY)
    inverse = _STANDARD_NORMAL.inv_cdf
    return np.fromiter((inverse(x) for x in p.ravel().tolist()), float, count=p.size).reshape(p.shape)


def slack(per_sample: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Seconds of each rank's mean step to leave free so the expected slowest step is shortest.

    One more sample on rank i lengthens the expected step by ``per_sample[i]``
    times the chance that rank i is the slowest, so at the optimum those
    chances are in inverse proportion to ``per_sample``: a rank whose samples
    are dear must rarely be the one the others wait for. A rank whose steps
    vary by ``spread[i]`` is held that often below the others' common time by
    leaving ``spread[i] * z`` free, where ``z`` is the normal quantile of one
    minus its chance. For two ranks of which one varies, this is the exact
    optimum; ranks of equal ``per_sample`` and ``spread`` get equal slack, so
    an equal split stays equal.

    Args:
        per_sample: each rank's seconds per sample (the cost model's slope).
        spread: each rank's step-to-step standard deviation (0: steady).

    Returns:
        Seconds, one entry per rank, to add to each rank's fixed cost before
        equalising predicted steps (``plan.equalise_step_times``).

    Examples:
        >>> [round(float(v), 2) for v in slack(np.array([0.4, 2.5]), np.array([1.0, 5.0]))]
        [-1.09, 5.45]
    """
    per_sample = np.asarray(per_sample, dtype=float)
    spread = np.nan_to_num(np.asarray(spread, dtype=float), nan=0.0)
    if len(per_sample) < 2 or not (spread > 0).any():
        return np.zeros(len(per_sample))
    chance = (1.0 / per_sample) / np.sum(1.0 / per_sample)
    return spread * normal_quantile(1.0 - chance)
