"""The local launcher wrapper runs dbs-train under both launchers; timeline passthrough."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import rank_environment

pytestmark = pytest.mark.mpi
REPO = Path(__file__).resolve().parents[1]


def run_local(folder: Path, launcher: str, *flags: str) -> Path:
    """``launch/run_local.sh 2 --epochs 1 --log LOG FLAGS`` under ``launcher``; fail if it fails."""
    log = folder / "run.jsonl"
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "run_local.sh"), "2", "--epochs", "1", "--log", str(log),
         *flags],
        capture_output=True, text=True, timeout=180, env=rank_environment({"LAUNCHER": launcher}),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return log


@pytest.fixture(scope="module")
def mpirun_run(tmp_path_factory):
    """One mpirun run of the wrapper with --log and --timeline, read by two tests."""
    folder = tmp_path_factory.mktemp("mpirun")
    log = run_local(folder, "mpirun", "--timeline", str(folder / "timeline.json"))
    return log, folder / "timeline.json"


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_run_local_wrapper_trains_and_logs(tmp_path, request, launcher):
    if launcher == "mpirun":
        log, _ = request.getfixturevalue("mpirun_run")
    else:
        log = run_local(tmp_path, launcher)
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(record["next_batch_sizes"]) == 64


def test_horovod_timeline_is_written(mpirun_run):
    _, timeline = mpirun_run
    text = timeline.read_text()
    assert text.lstrip().startswith("[") and "ALLREDUCE" in text.upper()
