"""Which GPU each local rank gets (the pure part of dbs_hvd.train.devices)."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbs_hvd.train.devices import gpu_for_local_rank, resolve_device


@given(gpus=st.integers(1, 16), data=st.data())
def test_a_gpu_of_its_own_for_each_rank_when_there_are_enough(gpus, data):
    local_size = data.draw(st.integers(1, gpus))
    indices = [gpu_for_local_rank(r, local_size, gpus, may_share=False) for r in range(local_size)]
    assert indices == list(range(local_size))


@given(gpus=st.integers(1, 8), extra=st.integers(1, 24))
def test_shared_gpus_are_filled_evenly(gpus, extra):
    local_size = gpus + extra
    indices = [gpu_for_local_rank(r, local_size, gpus, may_share=True) for r in range(local_size)]
    load = Counter(indices)
    assert set(load) == set(range(gpus))
    assert max(load.values()) - min(load.values()) <= 1


def test_nccl_refuses_sharing_with_a_message_that_says_what_to_do():
    # Every local rank gets the same error, the one whose index fits included.
    for rank in range(3):
        with pytest.raises(ValueError, match="3 ranks on this host but 2 GPU.*at most 2 rank"):
            gpu_for_local_rank(rank, 3, 2, may_share=False)


def test_no_gpu_and_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_for_local_rank(0, 1, 0, may_share=True)
    with pytest.raises(ValueError, match="outside 0..1"):
        gpu_for_local_rank(2, 2, 4, may_share=True)
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
