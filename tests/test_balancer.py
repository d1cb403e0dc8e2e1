"""balancer.py in a world of one: the rebalance record and the bounded history."""
from dbs_hvd.balancer import Rebalancer
from dbs_hvd.comm import LocalExchange
from dbs_hvd.policies import StaticPolicy
from dbs_hvd.sampler import DynamicBatchSampler
from dbs_hvd.timing import StepTimer


def test_history_keeps_only_the_most_recent_rebalances():
    sampler = DynamicBatchSampler(100, 10, rank=0, world_size=1)
    ticks = iter(range(1000))
    timer = StepTimer(clock=lambda: float(next(ticks)))  # each step takes one "second"
    timer.mark_start()
    rebalancer = Rebalancer(sampler, StaticPolicy(10), LocalExchange(), timer, history_limit=3)
    for step in range(5):
        timer.end_step(10)
        record = rebalancer.rebalance(step)
        assert record.plan_after == (10,) and record.ranks[0].samples == 10
    assert [r.step for r in rebalancer.history] == [2, 3, 4]
