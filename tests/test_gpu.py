"""The CUDA path under a real launcher: skipped where torch sees no GPU.

CI machines have none, so these run where a GPU is (``launch/gpu_check.sh``
builds Horovod for the machine's torch and runs this file). What they pin down:

* ``--device cuda`` trains as the CPU run does;
* the same run on GPU and on CPU gives the same losses: the N*b_i/B gradient
  weighting and the allreduce are right for CUDA tensors too (Horovod's NCCL
  path, or its MPI/Gloo path that stages GPU tensors through host memory);
* DBS sees a slowed rank through CUDA-synchronised compute timing and moves
  work off it.

Ranks share a GPU when there are fewer GPUs than ranks, which only a Horovod
built without NCCL allows (dbs_hvd.train.devices); tests that need more ranks than
that allows are skipped, saying why.
"""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

from dbs_hvd.train.metrics import read_jsonl
from tests.harness import run_job

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (launch/gpu_check.sh runs this on a GPU machine)"),
]

DBS_TRAIN = [sys.executable, "-m", "dbs_hvd.train.cli", "--device", "cuda"]


def _launcher() -> str:
    import horovod.torch as hvd

    return "mpirun" if hvd.mpi_built() and shutil.which("mpirun") else "horovodrun"


def _ranks_possible() -> int:
    """How many local ranks can train on this machine's GPUs (4 at most here)."""
    import horovod.torch as hvd

    gpus = torch.cuda.device_count()
    return gpus if hvd.nccl_built() else 4


def _train(np_: int, *args: str, timeout: float = 300) -> None:
    result = run_job(DBS_TRAIN + list(args), np=np_, launcher=_launcher(), timeout=timeout)
    print(result.output[-4000:])  # the epoch lines, for the person reading the GPU log
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)


def test_a_cnn_trains_on_one_gpu(tmp_path):
    # No comparison with the CPU here: convolutions run in TF32 on the GPU, and
    # the CNN's escape from its initial plateau amplifies that (on an H100, loss
    # 1.22 after 4 epochs vs 1.25 on the CPU). The exact comparison is the MLP's below.
    log = tmp_path / "run.jsonl"
    _train(1, "--model", "cnn", "--epochs", "4", "--global-batch", "64", "--lr", "0.1",
           "--log", str(log))
    records = read_jsonl(log)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], records


def test_gpu_and_cpu_runs_give_the_same_losses(tmp_path):
    np_ = min(2, _ranks_possible())
    plan = "48,16" if np_ == 2 else "64"
    common = ["--model", "mlp", "--policy", "static", "--plan", plan, "--epochs", "2",
              "--global-batch", "64", "--lr", "0.05"]
    gpu_log, cpu_log = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl"
    _train(np_, *common, "--log", str(gpu_log))
    _train(np_, *common, "--log", str(cpu_log), "--device", "cpu")  # the last --device wins
    gpu, cpu = read_jsonl(gpu_log), read_jsonl(cpu_log)
    assert [r["batch_sizes"] for r in gpu] == [r["batch_sizes"] for r in cpu]
    for g, c in zip(gpu, cpu):
        # Same data order, same weights: only float rounding differs (no TF32 in an MLP).
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-3), (g, c)
        assert abs(g["accuracy"] - c["accuracy"]) <= 0.01, (g, c)


def test_dbs_moves_work_off_a_slowed_rank_on_the_gpu(tmp_path):
    if _ranks_possible() < 2:
        pytest.skip("one GPU and a Horovod with NCCL: two ranks cannot share it")
    log = tmp_path / "run.jsonl"
    _train(2, "--model", "cnn", "--slowdown", "1,4", "--epochs", "4", "--global-batch", "64",
           "--lr", "0.1", "--log", str(log))
    records = read_jsonl(log)
    for record in records:
        assert sum(record["next_batch_sizes"]) == 64
    # The emulator stretches the rank's *measured* GPU compute 4-fold, so the
    # timer must have seen that compute (synchronised) for DBS to react.
    last = records[-1]
    assert last["batch_sizes"][1] < last["batch_sizes"][0], last
    assert last["compute_seconds"][1] > last["compute_seconds"][0], last


def test_an_optimizer_on_the_gpu_leaves_new_batch_sizes_out_of_its_speed_by_default():
    # The first step at a new size builds kernel plans on a GPU (benchmarks/results/gpu_check.md):
    # DistributedOptimizer(discount_new_sizes=None) must see the parameters there.
    from dbs_hvd.optim import resolve_discount_new_sizes

    on_gpu = torch.optim.SGD(torch.nn.Linear(4, 2).cuda().parameters(), lr=0.1)
    on_cpu = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    assert resolve_discount_new_sizes(None, on_gpu) is True
    assert resolve_discount_new_sizes(None, on_cpu) is False
    assert resolve_discount_new_sizes(False, on_gpu) is False


def test_dbs_on_a_grid_keeps_every_gpu_batch_a_multiple(tmp_path):
    # --batch-multiple exists for GPUs (fewer distinct sizes, each of which costs
    # a one-off kernel-planning step): the CUDA path must keep every plan on the grid.
    if _ranks_possible() < 2:
        pytest.skip("one GPU and a Horovod with NCCL: two ranks cannot share it")
    log = tmp_path / "run.jsonl"
    _train(2, "--model", "cnn", "--slowdown", "1,4", "--epochs", "4", "--global-batch", "64",
           "--batch-multiple", "8", "--lr", "0.1", "--log", str(log))
    records = read_jsonl(log)
    plans = [plan for record in records for plan in record["plans"]]
    plans += [record["next_batch_sizes"] for record in records]
    assert all(sum(plan) == 64 and all(size % 8 == 0 for size in plan) for plan in plans), plans
    assert records[-1]["batch_sizes"][1] < records[-1]["batch_sizes"][0], records[-1]
