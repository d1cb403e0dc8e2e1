#!/usr/bin/env bash
# Run dbs-train on NP local ranks of this machine.
#   launch/run_local.sh NP [dbs-train flags...]
# LAUNCHER=horovodrun (default) or mpirun. Ranks are oversubscribed when NP
# exceeds the cores, and each uses one torch thread (OMP_NUM_THREADS=1).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DBS_HVD_VENV:-$repo/.venv}
np=${1:?usage: run_local.sh NP [dbs-train flags...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Waiting ranks yield the CPU instead of spinning (matters when ranks share cores).
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
# and a rank under a CPU quota sleeps in those yields (dbs_hvd/quiet_yield.py).
if preload=$("$venv/bin/python" -m dbs_hvd.preload); then
    export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export PATH="$venv/bin:$PATH"
case "${LAUNCHER:-horovodrun}" in
    horovodrun)
        # "--" keeps horovodrun from reading dbs-train flags as its own (--log).
        exec horovodrun -np "$np" -H "localhost:$np" -- dbs-train "$@" ;;
    mpirun)
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        export OMPI_MCA_btl_vader_single_copy_mechanism=none
        exec mpirun --oversubscribe --bind-to none -np "$np" dbs-train "$@" ;;
    *)
        echo "run_local.sh: LAUNCHER must be horovodrun or mpirun, got ${LAUNCHER}" >&2; exit 2 ;;
esac
