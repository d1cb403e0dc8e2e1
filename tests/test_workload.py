"""dbs-train's workloads: the shifted digits, the cnn-flat model, --lr-schedule, --eval-every."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbs_hvd.train import checkpoint, data, models
from dbs_hvd.train.metrics import read_jsonl
from dbs_hvd.train.trainer import TrainConfig, check_flags, evaluate, evaluation_parts, lr_scheduler
from tests.harness import train_or_fail


@pytest.fixture(scope="module")
def shifted():
    return data.load("digits-shifted", flatten=False)


def test_shifted_digits_are_many_placed_copies_with_a_large_test_set(shifted):
    train, test = shifted
    plain_train, plain_test = data.digits(flatten=False, seed=0)
    assert len(train) == 4 * len(plain_train) and len(test) == 10 * len(plain_test)
    assert train.tensors[0].shape[1:] == (1, 24, 24)
    # Every label keeps its share: copies, not a resample.
    assert torch.equal(torch.bincount(test.tensors[1]), 10 * torch.bincount(plain_test.tensors[1]))
    # The copies of one digit sit in different places.
    n = len(plain_test)
    assert not torch.allclose(test.tensors[0][0], test.tensors[0][n])


def test_shifted_digits_do_not_depend_on_the_run_seed(shifted):
    again = data.load("digits-shifted", flatten=True, seed=7)
    assert torch.equal(again[1].tensors[0], shifted[1].tensors[0].flatten(1))


def test_shifted_digits_reject_a_glyph_larger_than_the_canvas():
    with pytest.raises(ValueError, match="glyph"):
        data.shifted_digits(False, canvas=12, glyph=16)


@pytest.mark.parametrize("size", [8, 24, 32])
def test_cnn_flat_classifies_any_square_image_of_at_least_8(size):
    model = models.build("cnn-flat", torch.Size([3, size, size]))
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="8x8"):
        models.small_cnn(1, 4, head="flat")
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet", torch.Size([1, 8, 8]))


def optimizer(lr=0.2):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lr_of(opt):
    return opt.param_groups[0]["lr"]


def test_constant_schedule_is_no_scheduler():
    assert lr_scheduler(optimizer(), TrainConfig(), 0, 10) is None


@settings(max_examples=30, deadline=None)
@given(total=st.integers(2, 60), resumed_at=st.integers(0, 60))
def test_cosine_is_a_function_of_the_step_so_a_resumed_run_continues_it(total, resumed_at):
    resumed_at = min(resumed_at, total)
    config = TrainConfig(lr=0.2, lr_schedule="cosine")
    fresh = optimizer()
    schedule = lr_scheduler(fresh, config, 0, total)
    for _ in range(resumed_at):
        fresh.step()
        schedule.step()
    resumed = optimizer(lr=0.0123)  # a resumed optimizer state carries the last lr
    lr_scheduler(resumed, config, resumed_at, total)
    assert lr_of(resumed) == pytest.approx(lr_of(fresh))
    assert lr_of(fresh) == pytest.approx(0.1 * (1 + math.cos(math.pi * resumed_at / total)))


def test_eval_every_must_not_be_negative_and_needs_no_elastic():
    with pytest.raises(ValueError, match="--eval-every"):
        check_flags(TrainConfig(eval_every=-1))
    with pytest.raises(ValueError, match="--elastic"):
        check_flags(TrainConfig(lr_schedule="cosine", elastic=True))


@pytest.mark.mpi
def test_dbs_train_anneals_and_evaluates_between_steps(tmp_path):
    log = tmp_path / "run.jsonl"
    train_or_fail(2, "--epochs", "2", "--lr-schedule", "cosine", "--eval-every", "5",
                  "--slowdown", "1,2", "--log", str(log), "--checkpoint-dir", str(tmp_path))
    records = read_jsonl(log)
    # The epoch's accuracy, evaluated in parts split by the (uneven) plan, is the
    # whole test set's accuracy of the saved model.
    assert records[-1]["batch_sizes"][0] != records[-1]["batch_sizes"][1]
    train_set, test_set = data.load("digits", flatten=True)
    model = models.build("mlp", train_set.tensors[0].shape[1:])
    model.load_state_dict(checkpoint.load_latest(tmp_path)["model"])
    assert records[-1]["accuracy"] == pytest.approx(evaluate(model, test_set), abs=1e-12)
    steps = [[int(step) for step, _ in r["evaluations"]] for r in records]
    assert steps == [[5, 10, 15, 20], [25, 30, 35, 40]]
    assert all(0 <= acc <= 1 for r in records for _, acc in r["evaluations"])
    assert records[-1]["accuracy"] > 0.5  # the annealed run still learns


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.lists(st.integers(0, 300), min_size=1, max_size=8).filter(lambda s: sum(s) > 0))
def test_evaluation_parts_cover_the_set_once_in_proportion_to_the_shares(size, shares):
    parts = evaluation_parts(size, shares)
    assert len(parts) == len(shares)
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    for (start, stop), share in zip(parts, shares):
        assert abs((stop - start) - size * share / sum(shares)) < 1 + 1e-9
        assert share or stop == start


@pytest.mark.parametrize("shares", [[], [0, 0], [2, -1]])
def test_evaluation_parts_need_non_negative_shares_with_a_positive_sum(shares):
    with pytest.raises(ValueError, match="evaluation shares"):
        evaluation_parts(10, shares)
