"""optim.py's gradient weight N * b_i / B: exactly 1 on an equal split, where nothing is scaled.

Exactness of the weighted updates against single-process training is tested
under mpirun (tests/mpi/mpi_core.py); these check, in one process, which steps
touch the gradients at all.
"""
import torch
from hypothesis import given, strategies as st
from torch import nn

from dbs_hvd.balancer import Rebalancer
from dbs_hvd.comm import LocalExchange
from dbs_hvd.optim import DynamicBatchState, LocalBatchWeighting
from dbs_hvd.plan import Plan
from dbs_hvd.policies import StaticPolicy
from dbs_hvd.sampler import DynamicBatchSampler
from dbs_hvd.timing import StepTimer


def state_for(plan: tuple[int, ...], rank: int = 0) -> DynamicBatchState:
    sampler = DynamicBatchSampler(sum(plan) * 4, sum(plan), rank=rank, world_size=len(plan),
                                  plan=Plan(plan))
    timer = StepTimer()
    rebalancer = Rebalancer(sampler, StaticPolicy(sum(plan)), LocalExchange(), timer)
    return DynamicBatchState(sampler, rebalancer, timer)


@given(plan=st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_weights_average_to_one_and_are_exactly_one_on_an_equal_split(plan):
    world = len(plan)
    weights = [Plan(tuple(plan)).weight(rank) for rank in range(world)]
    assert abs(sum(weights) / world - 1.0) < 1e-12
    equal = Plan((plan[0],) * world)
    assert [equal.weight(rank) for rank in range(world)] == [1.0] * world


def test_an_equal_split_step_registers_no_output_hook_and_an_uneven_one_does():
    for plan, hooked in (((16, 16), False), ((20, 12), True)):
        state = state_for(plan)
        model = nn.Linear(3, 2)
        state.weight_model_output(model)
        batch = next(iter(state.sampler))  # handed out, not yet consumed
        output = model(torch.randn(len(batch), 3))
        assert bool(output._backward_hooks) is hooked, plan
        output.sum().backward()
        weight = state.weight()
        assert weight == (plan[0] * len(plan) / sum(plan))
        expected = torch.full_like(model.bias.grad, float(len(batch)) * weight)
        torch.testing.assert_close(model.bias.grad, expected)


def test_a_forward_outside_a_training_step_does_not_consume_a_batch():
    state = state_for((20, 12))
    model = nn.Linear(3, 2)
    state.weight_model_output(model)
    iterator = iter(state.sampler)
    next(iterator)
    model(torch.randn(4, 3))  # e.g. a look at the outputs with gradients enabled
    assert state.sampler.peek_consumed() is not None
    assert state.current_batch().step == 0


def test_the_compressor_leaves_equal_split_gradients_untouched_and_scales_the_others():
    for plan in ((16, 16), (20, 12)):
        state = state_for(plan)
        next(iter(state.sampler))
        weighting = LocalBatchWeighting(state.weight)
        gradient = torch.ones(5)
        compressed, _ = weighting.compress(gradient)
        torch.testing.assert_close(compressed, torch.full((5,), state.weight()))
        assert (state.weight() == 1.0) is (plan == (16, 16))
