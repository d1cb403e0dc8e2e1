"""Per-epoch records: balance efficiency, summaries, JSON lines."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Sequence

import numpy as np


def balance_efficiency(samples: Sequence[float], compute: Sequence[float],
                       wall: Sequence[float]) -> float:
    """Ideal / actual time for the work the ranks did (1.0 = perfectly balanced).

    Ideal: the total samples divided by the sum of the ranks' measured speeds
    (samples per compute second), i.e. the time if every rank were busy all the
    time. Actual: the shortest rank wall time (compute + allreduce wait) over the
    same steps. Communication cost itself also lowers the figure; that is real.

    Why the shortest: every step ends for all ranks when its allreduce does, so
    the ranks' walls differ only in where they started. A rank that finished
    the previous epoch's evaluation early waits in the first allreduce for the
    others to begin; that wait is on its wall but is no part of the epoch's
    training. The rank that began last waited for nobody at the start, so its
    wall is the time in which all ranks trained. The longest wall counted the
    evaluation skew as imbalance: on [1,2,4] it came to 1.05 s on a 0.94 s epoch.
    """
    samples = np.asarray(samples, float)
    compute = np.asarray(compute, float)
    wall = np.asarray(wall, float)
    if np.any(compute <= 0) or np.any(samples <= 0) or wall.min() <= 0:
        return float("nan")
    ideal = samples.sum() / (samples / compute).sum()
    return float(ideal / wall.min())


@dataclass
class EpochRecord:
    """One epoch of a run, as logged on rank 0 (one JSON object per line)."""

    epoch: int
    loss: float
    accuracy: float
    seconds: float
    batch_sizes: list[int]  # the plan used for most of the epoch's steps
    next_batch_sizes: list[int]  # the plan chosen at the epoch's end
    compute_seconds: list[float]
    wait_seconds: list[float]
    samples: list[int]
    efficiency: float
    policy: str
    plans: list[list[int]] = field(default_factory=list)  # every plan used in the epoch

    def line(self) -> str:
        return (
            f"epoch {self.epoch:3d}  loss {self.loss:.4f}  acc {100 * self.accuracy:5.2f}%  "
            f"{self.seconds:6.2f}s  batch {self.batch_sizes} -> {self.next_batch_sizes}  "
            f"compute {_fmt(self.compute_seconds)}  wait {_fmt(self.wait_seconds)}  "
            f"eff {self.efficiency:.3f}"
        )


def _fmt(values: Iterable[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in values) + "]"


def json_line(record: object) -> str:
    """One JSON line for a dataclass record (or a plain dict)."""
    payload = asdict(record) if hasattr(record, "__dataclass_fields__") else record
    return json.dumps(payload) + "\n"


def append_json_lines(path: str | Path, records: Iterable[object]) -> None:
    """Append records to a JSON-lines file, opened only for this write.

    For logs that another process may continue (elastic mode: rank 0 can be
    another process in the next world).
    """
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json_line(record) for record in records)


class JsonLinesLog:
    """Append-only JSON-lines log; each record is flushed so a crash loses nothing written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(self.path, "w", encoding="utf-8")

    def write(self, record: object) -> None:
        self._fh.write(json_line(record))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
