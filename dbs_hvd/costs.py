"""Splitting one global batch by cost rather than by count: pure numpy, no torch, no MPI.

In cost mode (``SampleCosts``, options.py) every sample has a cost, such as
its token count, and a plan's shares ``b_i / B`` are shares of each step's
total *cost*: the global batch of step ``t`` is still the same ``B`` samples
(``perm[t*B:(t+1)*B]``, whatever the plan), and only which of them go to
which rank depends on the plan. ``split_by_cost`` decides that, from the
step's indices, their costs and the plan alone, so every rank computes the
same assignment without communication.

The split is a contiguous partition of the step's samples, taken in order of
increasing cost (a stable sort: equal costs keep their order in the stream)
or, with ``order="stream"``, in stream order, with each cut placed where the
running cost comes nearest to the plan's running share of the step's total.

* Precision: each cut lands within half the cost of the sample it falls on,
  so a rank's cost is within one sample's cost of its share. With equal
  costs the split is exactly the count split.
* Why sorted by default: each rank's samples then have similar costs, so
  padding a rank's batch to its longest sample wastes little and its padded
  work stays close to the cost the split balanced.

Every rank gets at least ``min_count`` samples, so no rank trains on an
empty batch; where the plan's share would give a rank less, the cut moves
the extra samples to it from its neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SORTED = "sorted"
STREAM = "stream"
ORDERS = (SORTED, STREAM)


def check_costs(costs: Sequence[float] | np.ndarray, name: str = "costs=") -> np.ndarray:
    """Return ``costs`` as a 1-D float64 array after checking every value is finite and positive.

    Args:
        costs: one cost per sample.
        name: how the error message names the argument.

    Returns:
        The costs as a read-only float64 array.

    Raises:
        ValueError: for an array that is not 1-D, is empty, or holds a value
            that is not finite or not positive.

    Example:
        >>> check_costs([3, 1, 2]).tolist()
        [3.0, 1.0, 2.0]
    """
    try:
        array = np.array(costs, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a sequence of numbers, one per sample: {error}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence, one cost per sample; got shape {array.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(array) | (array <= 0))
    if bad.size:
        first = int(bad[0])
        raise ValueError(
            f"{name} must hold finite positive costs; sample {first} has cost {float(array[first])} "
            f"({bad.size} such samples in all)"
        )
    array.setflags(write=False)
    return array


def split_by_cost(
    costs: np.ndarray, batch_sizes: Sequence[int], min_count: int = 1, order: str = SORTED
) -> list[np.ndarray]:
    """Positions of one global batch for each rank, so that rank costs follow the plan's shares.

    Args:
        costs: the costs of the step's samples, in stream order (length ``B``).
        batch_sizes: the plan, one entry per rank, summing to ``B``: rank
            ``i``'s target is the fraction ``batch_sizes[i] / B`` of the step's
            total cost.
        min_count: the fewest samples any rank gets.
        order: ``"sorted"`` partitions the samples sorted by cost (stable),
            ``"stream"`` partitions them in stream order.

    Returns:
        One integer array per rank of positions into ``costs`` (in the order
        the partition takes them); together they hold each position once.

    Raises:
        ValueError: for a plan that does not sum to ``len(costs)``, a
            ``min_count`` the batch cannot give every rank, or an unknown
            ``order``.

    Example:
        >>> low, high = split_by_cost(np.array([1.0, 1, 1, 1, 4]), [3, 2])
        >>> low.tolist(), high.tolist()  # costs 4 and 4: a share of 3/5 is nearest 4 of 8
        ([0, 1, 2, 3], [4])
        >>> low, high = split_by_cost(np.array([4.0, 1, 1, 1, 1]), [2, 3])
        >>> low.tolist(), high.tolist()  # sorted by cost: the costly sample goes last
        ([1, 2, 3], [4, 0])
    """
    costs = np.asarray(costs, dtype=np.float64)
    sizes = [int(b) for b in batch_sizes]
    count = len(costs)
    world = len(sizes)
    if sum(sizes) != count:
        raise ValueError(f"batch_sizes {sizes} sum to {sum(sizes)}, not the {count} samples of the step")
    if min_count < 0 or min_count * world > count:
        raise ValueError(f"min_count={min_count} for {world} ranks does not fit a step of {count} samples")
    if order not in ORDERS:
        raise ValueError(f"order= must be one of {ORDERS}, got {order!r}")
    taken = np.argsort(costs, kind="stable") if order == SORTED else np.arange(count)
    # prefix[j]: the cost of the first j samples taken; a cut at j gives them to the lower ranks.
    prefix = np.concatenate(([0.0], np.cumsum(costs[taken])))
    total = prefix[-1]
    cuts = [0]
    planned = 0
    for rank in range(world - 1):
        planned += sizes[rank]
        target = total * planned / count
        j = int(np.searchsorted(prefix, target))  # prefix[j - 1] < target <= prefix[j]
        if j > 0 and target - prefix[j - 1] <= prefix[j] - target:
            j -= 1  # the cut below the target is at least as near (ties go down)
        low = cuts[-1] + min_count
        high = count - (world - 1 - rank) * min_count
        cuts.append(min(max(j, low), high))
    cuts.append(count)
    return [taken[cuts[r] : cuts[r + 1]] for r in range(world)]


def units_of(rank_cost: float, step_cost: float, global_batch: int) -> float:
    """A rank's cost in a step, in the plan's units: ``B * rank_cost / step_cost``.

    The plans and the policies count in samples of a global batch of ``B``;
    in cost mode a rank's share of the step's cost is reported in the same
    units, so the ranks' units in one step add up to ``B`` and a policy learns
    seconds per unit of cost.

    Example:
        >>> units_of(30.0, 120.0, 64)
        16.0
    """
    return global_batch * rank_cost / step_cost
