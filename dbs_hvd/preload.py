"""Print the path of dbs_hvd's preloadable ``sched_yield`` library, for launchers.

    mpirun -x LD_PRELOAD=$(python -m dbs_hvd.preload) -x OMPI_MCA_mpi_yield_when_idle=1 ...

See :mod:`dbs_hvd.quiet_yield` for what it does and when it is on. Exits 1,
saying how to build the library, where it is missing.
"""

from __future__ import annotations

import sys

from .quiet_yield import library_path


def main() -> int:
    """Print the library's path; 1 (with a message on stderr) where it was not built."""
    path = library_path()
    if path is None:
        print(
            "dbs_hvd.preload: the sched_yield library was not built; reinstall dbs_hvd "
            "with `pip install -e .` (it needs a C compiler)",
            file=sys.stderr,
        )
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
