"""dbs-plot: draw a dbs-train JSON-lines log as a PNG.

Three panels over epochs: each rank's local batch size (the plan in force at
the epoch's start), each rank's compute and allreduce-wait seconds, and the
balance efficiency. matplotlib is an optional dependency (extra "plot").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .metrics import read_jsonl


def plot_run(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the three-panel figure for ``records`` (dbs-train epoch records) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("the log holds no epoch records")
    epochs = [r["epoch"] for r in records]
    world = len(records[0]["batch_sizes"])
    fig, (sizes_ax, time_ax, eff_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for rank in range(world):
        sizes_ax.step(epochs, [r["batch_sizes"][rank] for r in records], where="post", label=f"rank {rank}")
        if records[0]["compute_seconds"]:
            (line,) = time_ax.plot(
                epochs,
                [r["compute_seconds"][rank] for r in records],
                marker="o",
                label=f"rank {rank} compute",
            )
            time_ax.plot(
                epochs,
                [r["wait_seconds"][rank] for r in records],
                linestyle="--",
                color=line.get_color(),
                label=f"rank {rank} wait",
            )
    time_ax.plot(epochs, [r["seconds"] for r in records], color="black", label="epoch wall")
    eff_ax.plot(epochs, [r["efficiency"] for r in records], marker="o")
    eff_ax.axhline(1.0, color="grey", linewidth=0.8)
    eff_ax.set_ylim(0, 1.05)
    sizes_ax.set_ylabel("local batch size")
    time_ax.set_ylabel("seconds per epoch")
    eff_ax.set_ylabel("balance efficiency")
    eff_ax.set_xlabel("epoch")
    sizes_ax.legend(fontsize=7, ncol=2)
    time_ax.legend(fontsize=7, ncol=2)
    sizes_ax.set_title(title or f"{records[0].get('policy', '')}: {world} ranks")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_main(argv: Sequence[str] | None = None) -> int:
    """The ``dbs-plot`` command: draw a dbs-train ``--log`` file as a PNG.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 when the log cannot be read or drawn (the
        error goes to stderr).
    """
    parser = argparse.ArgumentParser(prog="dbs-plot", description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a dbs-train --log file (JSON lines)")
    parser.add_argument("-o", "--output", help="PNG to write (default: LOG with .png)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        records = read_jsonl(args.log)
        out = plot_run(records, args.output or Path(args.log).with_suffix(".png"), args.title)
    except (OSError, ValueError, KeyError) as error:
        sys.stderr.write(f"dbs-plot: error: {error}\n")
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(plot_main())
