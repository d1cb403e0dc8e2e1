"""The trainer keeps setup's objects out of garbage-collection passes during training."""
import gc

from dbs_hvd.train.trainer import freeze_setup_objects


def test_objects_built_before_training_leave_the_collected_generations():
    setup = [[index] for index in range(1000)]  # lists are tracked by the collector
    try:
        freeze_setup_objects()
        assert gc.get_freeze_count() >= len(setup)
        collected = {id(obj) for obj in gc.get_objects()}
        assert not any(id(obj) in collected for obj in setup)
        during_training = [[index] for index in range(10)]
        collected = {id(obj) for obj in gc.get_objects()}
        assert all(id(obj) in collected for obj in during_training)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
