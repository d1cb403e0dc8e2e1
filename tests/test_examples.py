"""The example pair (plain Horovod script, the same with dbs_hvd) runs under mpirun."""
import re
import sys
from pathlib import Path

import pytest

from tests.harness import run_job

pytestmark = pytest.mark.mpi
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["plain_horovod.py", "with_dbs.py"])
def test_example_trains_under_mpirun(script):
    result = run_job([sys.executable, str(EXAMPLES / script)], np=2, timeout=180)
    assert result.ok, result.describe()
    text = "\n".join(result.rank_output.get(0, []))
    accuracy = float(re.search(r"train accuracy ([0-9.]+)", text).group(1))
    assert accuracy >= 0.95, text


def test_dbs_example_differs_from_plain_horovod_in_three_marked_lines():
    plain = (EXAMPLES / "plain_horovod.py").read_text().splitlines()
    dbs = (EXAMPLES / "with_dbs.py").read_text().splitlines()
    marked = [line for line in dbs if line.rstrip().endswith("# DBS")]
    assert len(marked) == 3
    # Apart from the docstring, imports and the marked statements, the loops are identical.
    body = lambda lines: [l for l in lines[lines.index("hvd.init()"):]
                          if "sampler" not in l and "loader =" not in l
                          and "optimizer = " not in l and "named_parameters" not in l
                          and "final plan" not in l]
    assert body(plain) == body(dbs)


def test_char_lm_example_trains_in_cost_mode_and_its_loss_falls():
    # The repository root on the path: the example imports this checkout's dbs_hvd.
    command = [sys.executable, str(EXAMPLES / "char_lm.py"), "--steps", "30", "--print-every", "10",
               "--samples", "1024", "--max-len", "64", "--global-batch", "32"]
    result = run_job(command, np=2, timeout=300, env={"PYTHONPATH": str(EXAMPLES.parent)})
    assert result.ok, result.describe()
    text = "\n".join(result.rank_output.get(0, []))
    losses = [float(value) for value in re.findall(r"step \d+ loss ([0-9.]+)", text)]
    assert len(losses) == 3, text
    # From about ln(256) = 5.5 per byte at the start; a model that learned nothing stays there.
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < 3.5, text
    assert re.search(r"final plan \[\d+, \d+\]", text), text
