"""The local launcher wrapper runs dbs-train under both launchers; timeline passthrough."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import rank_environment

pytestmark = pytest.mark.mpi
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_run_local_wrapper_trains_and_logs(tmp_path, launcher):
    log = tmp_path / "run.jsonl"
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "run_local.sh"), "2", "--epochs", "1", "--log", str(log)],
        capture_output=True, text=True, timeout=180, env=rank_environment({"LAUNCHER": launcher}),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(record["next_batch_sizes"]) == 64


def test_horovod_timeline_is_written(tmp_path):
    timeline = tmp_path / "timeline.json"
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "run_local.sh"), "2", "--epochs", "1",
         "--timeline", str(timeline)],
        capture_output=True, text=True, timeout=180, env=rank_environment({"LAUNCHER": "mpirun"}),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = timeline.read_text()
    assert text.lstrip().startswith("[") and "ALLREDUCE" in text.upper()
