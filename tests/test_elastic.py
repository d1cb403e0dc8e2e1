"""Elastic dbs-train under real horovodrun: a rank killed mid-epoch, the run finishes on two.

One machine plays a two-host cluster: launch/discover_hosts.sh prints
``localhost:2`` and ``127.0.0.1:1`` (Horovod's elastic mode refuses fewer than two
hosts). The rank on 127.0.0.1 is killed in the middle of epoch 1; Horovod
blacklists that host, and the two ranks on localhost must go on from the last
commit, with a plan of two entries, and finish. Every process logs the sample
indices it trained on (``--read-log``), and rank 0 logs its commits, which makes
the exactly-once claim checkable: in each epoch the ranks' reads cover every
sample of the epoch's global batches, and the only samples read twice are those
of the steps between the last commit and the failure.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest

from dbs_hvd.train.metrics import read_jsonl
from dbs_hvd.plan import PlanError
from tests.harness import rank_environment

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
GLOBAL_BATCH, EPOCHS, COMMIT_EVERY, FAIL_EPOCH, FAIL_AFTER_STEP = 64, 3, 5, 1, 7


def elastic_argv(read_log: Path, extra: tuple[str, ...] = ()) -> list[str]:
    # No "--" before the command: Horovod's elastic launcher passes it on to the
    # shell; so --log, which horovodrun would take for its --log-level, goes in
    # an @file. The timeouts and the cooldown keep the driver from waiting 600 s
    # (and ignoring SIGTERM) and keep the killed "host" out for the whole run.
    # The Gloo timeout (default 30 s) bounds how long a survivor that was not
    # connected to the killed rank waits in its collective before it resets.
    options = read_log.parent / "options.txt"
    options.write_text(f"--log\n{read_log.parent / 'epochs.jsonl'}\n"
                       f"--rebalance-log\n{read_log.parent / 'rebalances.jsonl'}\n")
    return [
        HOROVODRUN, "-np", "3", "--min-np", "2", "--max-np", "3",
        "--host-discovery-script", str(ROOT / "launch" / "discover_hosts.sh"),
        "--start-timeout", "30", "--elastic-timeout", "30", "--gloo-timeout-seconds", "10",
        "--blacklist-cooldown-range", "200", "300",
        sys.executable, "-m", "dbs_hvd.train.cli", "--elastic", "--commit-every", str(COMMIT_EVERY),
        "--virtual-device", "0:2", "--epochs", str(EPOCHS), "--global-batch", str(GLOBAL_BATCH),
        "--read-log", str(read_log), *extra, f"@{options}",
    ]


def read_records(directory: Path) -> list[dict]:
    records = []
    for path in sorted(directory.glob("reads-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written right now (only while polling)
    return records


def worker_on(host: str, launcher: psutil.Process) -> list[psutil.Process]:
    """The dbs-train ranks that Horovod started on ``host`` (its HOROVOD_HOSTNAME)."""
    found = []
    for proc in launcher.children(recursive=True):
        try:
            if (proc.cmdline()[1:3] == ["-m", "dbs_hvd.train.cli"]
                    and proc.environ().get("HOROVOD_HOSTNAME") == host):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return found


def run_and_kill_one(read_log: Path, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    proc = subprocess.Popen(elastic_argv(read_log, extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=rank_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["kind"] == "read" and r["epoch"] == FAIL_EPOCH and r["step"] >= FAIL_AFTER_STEP
                   for r in read_records(read_log)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the step to kill at:\n"
                        + (proc.communicate(timeout=10)[0] if proc.poll() is not None else ""))
        victims = worker_on("127.0.0.1", psutil.Process(proc.pid))
        assert len(victims) == 1, victims
        victims[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=100)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("multiple", [1, 8], ids=["any size", "grid of 8"])
def test_a_killed_rank_mid_epoch_the_run_finishes_on_two_without_losing_a_sample(
        tmp_path, multiple):
    from dbs_hvd.train import data
    from dbs_hvd.sampler import DynamicBatchSampler

    read_log = tmp_path / "reads"
    returncode, output = run_and_kill_one(read_log, ("--batch-multiple", str(multiple)))
    assert returncode == 0, output[-5000:]

    records = read_records(read_log)
    reads = [r for r in records if r["kind"] == "read"]
    commits = [r for r in records if r["kind"] == "commit"]
    # --batch-multiple: the world of 3 and the world of 2 after the failure both
    # plan on the grid (the new world starts from the policy's initial plan).
    assert all(len(r["indices"]) % multiple == 0 for r in reads), \
        sorted({len(r["indices"]) for r in reads})
    assert all(size % multiple == 0 for c in commits for size in c["plan"]), commits
    train_set, _ = data.load("digits", flatten=True, seed=0)
    stream = DynamicBatchSampler(len(train_set), GLOBAL_BATCH, rank=0, world_size=1, seed=0)
    steps = stream.steps_per_epoch

    # The run ended on two ranks: the last commit (after the last epoch) and the
    # last epoch's plan have two entries summing to the global batch.
    final = max(commits, key=lambda c: (c["epoch"], c["step"]))
    assert (final["epoch"], final["step"], final["world"]) == (EPOCHS, 0, 2), final
    assert len(final["plan"]) == 2 and sum(final["plan"]) == GLOBAL_BATCH, final
    last_line = [line for line in output.splitlines() if re.search(r"epoch +%d " % (EPOCHS - 1), line)]
    assert last_line and re.search(r"-> \[\d+, \d+\]", last_line[-1]), output[-3000:]
    assert {r["world"] for r in reads if r["epoch"] == EPOCHS - 1} == {2}
    # --log: one record per epoch, written by whichever process was rank 0.
    logged = read_jsonl(tmp_path / "epochs.jsonl")
    assert [r["epoch"] for r in logged] == list(range(EPOCHS)), logged
    assert len(logged[0]["batch_sizes"]) == 3 and len(logged[-1]["next_batch_sizes"]) == 2
    assert sum(logged[-1]["next_batch_sizes"]) == GLOBAL_BATCH
    # --rebalance-log, also written by whichever process was rank 0: every
    # epoch's rebalances by the world that finished it, in order, each plan
    # the one the rebalance before it left (but where the world changed), on
    # the grid, and each with the policy's view of its decision.
    rebalances = read_jsonl(tmp_path / "rebalances.jsonl")
    assert [r["epoch"] for r in rebalances] == sorted(r["epoch"] for r in rebalances)
    assert {r["epoch"] for r in rebalances} == set(range(EPOCHS))
    for r in rebalances:
        world = 3 if r["epoch"] < FAIL_EPOCH else 2 if r["epoch"] > FAIL_EPOCH else len(r["ranks"])
        assert len(r["ranks"]) == len(r["plan_after"]) == world, r
        assert sum(r["plan_after"]) == GLOBAL_BATCH
        assert all(size % multiple == 0 for size in r["plan_after"]), r
        assert r["extra"]["policy"] is not None and r["extra"]["interval"] >= 1
    assert {len(r["ranks"]) for r in rebalances if r["epoch"] == FAIL_EPOCH} == {2}
    for before, after in zip(rebalances, rebalances[1:]):
        if len(before["ranks"]) == len(after["ranks"]):
            assert after["plan_before"] == before["plan_after"], (before, after)
    last_of_epoch = {r["epoch"]: r["plan_after"] for r in rebalances}
    assert [last_of_epoch[e] for e in range(EPOCHS)] == \
        [r["next_batch_sizes"] for r in logged]

    # Each step's pieces, in rank order, are exactly that step's global batch of
    # the stream (whenever every rank of the world logged the step: the killed
    # rank may not have logged its last one).
    pieces: dict[tuple, dict[int, list[int]]] = defaultdict(dict)
    for r in reads:
        key = (r["epoch"], r["step"], r["world"])
        assert r["rank"] not in pieces[key], f"rank {r['rank']} read {key} twice"
        pieces[key][r["rank"]] = r["indices"]
    for (epoch, step, world), by_rank in pieces.items():
        if len(by_rank) == world:
            stream.set_epoch(epoch)
            joined = [i for rank in range(world) for i in by_rank[rank]]
            assert joined == stream.global_batch_indices(step).tolist(), (epoch, step, world)

    for epoch in range(EPOCHS):
        stream.set_epoch(epoch)
        expected = set(stream.permutation()[:steps * GLOBAL_BATCH].tolist())
        counts = Counter(i for r in reads if r["epoch"] == epoch for i in r["indices"])
        assert set(counts) == expected, f"epoch {epoch}: samples missed or foreign"
        if epoch != FAIL_EPOCH:
            assert max(counts.values()) == 1, f"epoch {epoch} read samples twice"
            continue
        # The failure epoch: world 3 read steps 0..f, world 2 resumed at the last commit c.
        by_world = {w: {r["step"] for r in reads if r["epoch"] == epoch and r["world"] == w}
                    for w in (2, 3)}
        resumed = min(by_world[2])
        last_commit = max(c["step"] for c in commits
                          if c["world"] == 3 and c["epoch"] == epoch)
        assert resumed == last_commit and resumed % COMMIT_EVERY == 0, (resumed, commits)
        assert by_world[2] == set(range(resumed, steps))
        assert by_world[3] == set(range(max(by_world[3]) + 1)) and max(by_world[3]) >= FAIL_AFTER_STEP
        repeated_steps = by_world[2] & by_world[3]
        assert repeated_steps <= set(range(resumed, resumed + COMMIT_EVERY)), repeated_steps
        # Read twice: exactly what the old world read after the commit (its
        # updates were undone by the restore), nothing else, never thrice.
        twice = {i for i, n in counts.items() if n == 2}
        assert max(counts.values()) <= 2
        assert twice == {i for r in reads if r["epoch"] == epoch and r["world"] == 3
                         and r["step"] >= resumed for i in r["indices"]}
    assert "elastic world of 2 ranks" in output, output[-3000:]


def test_a_resized_stream_reads_each_sample_once():
    """The sampler alone: 3 ranks read to step 7, then 2 ranks from step 5 (the commit)."""
    from dbs_hvd.sampler import DynamicBatchSampler

    def world(size):
        return [DynamicBatchSampler(1000, 64, rank=r, world_size=size, seed=3) for r in range(size)]

    old, counts = world(3), Counter()
    for sampler in old:
        sampler.set_epoch(2)
        counts.update(i for _, batch in zip(range(7), sampler) for i in batch)
    new = old[:2]
    for rank, sampler in enumerate(new):
        sampler.resize(rank, 2)
        sampler.seek(2, 5)
        assert sampler.plan.batch_sizes == (32, 32) and len(sampler) == 15 - 5
        counts.update(i for batch in sampler for i in batch)
    assert set(counts) == set(new[0].permutation()[:15 * 64].tolist())
    twice = {i for i, n in counts.items() if n > 1}
    assert twice == set(new[0].permutation()[5 * 64:7 * 64].tolist())
    with pytest.raises(PlanError, match="smaller than the world size"):
        new[0].resize(0, 65)
    with pytest.raises(PlanError, match="outside an epoch"):
        new[0].seek(2, 16)


@pytest.mark.parametrize("options, message", [
    ({"policy": "horovod"}, "--elastic runs the DBS optimizer"),
    ({"mode": "average"}, "--mode gradient only"),
    ({"checkpoint_dir": "ckpt"}, "keeps its state in memory"),
    ({"plan": "48,16"}, "leave --plan out with --elastic"),
])
def test_options_elastic_mode_cannot_honour_are_refused_with_the_reason(options, message):
    from dbs_hvd.train.elastic import _check_supported
    from dbs_hvd.train.trainer import TrainConfig

    with pytest.raises(ValueError, match=message):
        _check_supported(TrainConfig(elastic=True, **options))
