"""checkpoint.py: atomic writes, pruning, damaged and foreign files refused with clear errors."""
import pytest
import torch

from dbs_hvd.train import checkpoint
from dbs_hvd.train.checkpoint import CheckpointError


def payload(value=1.0):
    return {"epoch": 0, "config": {"global_batch": 64}, "model": {"w": torch.full((3,), value)}}


def test_round_trip_and_latest(tmp_path):
    checkpoint.save(tmp_path, 0, payload(1.0))
    checkpoint.save(tmp_path, 1, payload(2.0) | {"epoch": 1})
    latest = checkpoint.load_latest(tmp_path)
    assert latest["epoch"] == 1 and torch.equal(latest["model"]["w"], torch.full((3,), 2.0))


def test_only_the_last_few_are_kept(tmp_path):
    for epoch in range(5):
        checkpoint.save(tmp_path, epoch, payload(), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000003.pt", "ckpt-000004.pt"]


def test_a_write_interrupted_before_the_rename_leaves_the_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 0, payload(1.0))
    # What a crash mid-write leaves: a partial temporary file, never the final name.
    (tmp_path / "ckpt-000001.pt.tmp").write_bytes(b"\x80\x02partial")
    latest = checkpoint.load_latest(tmp_path)
    assert latest["epoch"] == 0


def test_a_crash_inside_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 0, payload(1.0))

    def dies(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 1, payload(2.0))
    monkeypatch.undo()
    assert checkpoint.load_latest(tmp_path)["epoch"] == 0


def test_damaged_file_is_refused_with_a_clear_error(tmp_path):
    path = checkpoint.save(tmp_path, 0, payload())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read as a dbs_hvd checkpoint"):
        checkpoint.load(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "ckpt-000000.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a dbs_hvd checkpoint"):
        checkpoint.load(path)


def test_no_checkpoint_to_resume_from(tmp_path):
    with pytest.raises(CheckpointError, match="found no checkpoint"):
        checkpoint.load_latest(tmp_path / "missing")


def test_configuration_change_is_refused_but_epochs_may_grow():
    saved = {"global_batch": 64, "seed": 1, "epochs": 2, "log": "a.jsonl"}
    checkpoint.check_config(saved, saved | {"epochs": 5, "log": "b.jsonl"})
    with pytest.raises(CheckpointError, match="global_batch: checkpoint 64, now 32"):
        checkpoint.check_config(saved, saved | {"global_batch": 32})


def test_rebalance_timing_may_change_on_resume_but_the_policy_may_not():
    # A checkpoint from before --rebalance-min-seconds existed lacks the key.
    saved = {"global_batch": 64, "policy": "dbs", "rebalance_every": None,
             "rebalance_budget": 0.02}
    checkpoint.check_config(saved, saved | {"rebalance_every": 4, "rebalance_budget": 0.05,
                                            "rebalance_min_seconds": 0.15, "warmup_steps": 0,
                                            "max_deadband": 0.1, "rebalance_log": "r.jsonl"})
    with pytest.raises(CheckpointError, match="policy: checkpoint 'dbs', now 'paper'"):
        checkpoint.check_config(saved, saved | {"policy": "paper"})


WRITER = """
import sys, torch
from dbs_hvd.train import checkpoint
big = torch.randn(32 * 2**20 // 4)  # 32 MiB: each write takes a while
for epoch in range(1000):
    print(f"writing {epoch}", flush=True)
    checkpoint.save(sys.argv[1], epoch, {"epoch": epoch, "config": {}, "model": {"w": big + epoch}})
"""


def test_a_process_killed_while_writing_leaves_a_loadable_previous_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for line in writer.stdout:
            if line.strip() == "writing 3":
                break
        # Inside the fourth write: its temporary file exists, the rename has not happened.
        deadline = time.monotonic() + 30
        while not (tmp_path / "ckpt-000003.pt.tmp").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == -signal.SIGKILL
    killed_mid_write = (tmp_path / "ckpt-000003.pt.tmp").exists()
    latest = checkpoint.load_latest(tmp_path)
    if killed_mid_write:  # the usual case: the half-written file never got the final name
        assert latest["epoch"] == 2
    else:  # the rename won the race with the kill
        assert latest["epoch"] == 3
    assert latest["model"]["w"].numel() == 32 * 2**20 // 4
