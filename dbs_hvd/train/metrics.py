"""Per-epoch records: balance efficiency, summaries, JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from numpy.typing import ArrayLike


def balance_efficiency(samples: ArrayLike, compute: ArrayLike, wall: ArrayLike) -> float:
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
    wall is the time in which all ranks trained. The longest wall would count
    the evaluation skew as imbalance, which on a short epoch can be as long as
    the epoch itself.

    Args:
        samples: samples each rank processed.
        compute: each rank's compute seconds over the same steps.
        wall: each rank's compute + allreduce-wait seconds.

    Returns:
        The efficiency, or NaN where a rank has no positive samples, compute
        or wall time.

    Examples:
        >>> balance_efficiency([100, 100], [1.0, 2.0], [2.0, 2.0])
        0.6666666666666666
    """
    samples_ = np.asarray(samples, float)
    compute_ = np.asarray(compute, float)
    wall_ = np.asarray(wall, float)
    if np.any(compute_ <= 0) or np.any(samples_ <= 0) or wall_.min() <= 0:
        return float("nan")
    ideal = samples_.sum() / (samples_ / compute_).sum()
    return float(ideal / wall_.min())


@dataclass
class EpochRecord:
    """One epoch of a run, as logged on rank 0 (one JSON object per line)."""

    epoch: int
    loss: float
    accuracy: float
    seconds: float
    batch_sizes: list[int]  # the plan used for most of the epoch's steps
    next_batch_sizes: list[int]  # the plan the next epoch starts with
    compute_seconds: list[float]
    wait_seconds: list[float]
    samples: list[int]
    efficiency: float
    policy: str
    plans: list[list[int]] = field(default_factory=list)  # every plan used in the epoch
    evaluations: list[list[float]] = field(default_factory=list)  # [step, accuracy]: --eval-every

    def line(self) -> str:
        """The record as one human-readable line (dbs-train's per-epoch output)."""
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
    payload = asdict(cast(Any, record)) if hasattr(record, "__dataclass_fields__") else record
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
        """Append one record (a dataclass or a dict) as a line, and flush it."""
        self._fh.write(json_line(record))
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSON-lines file, in order; blank lines are skipped."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
