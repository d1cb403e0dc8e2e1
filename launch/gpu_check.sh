#!/usr/bin/env bash
# Check dbs_hvd's CUDA path on a GPU machine, offline: build Horovod for the
# machine's own torch, then run tests/test_gpu.py under it.
#
# Two Horovod flavours are built side by side (half the cores each), because
# they exercise different code:
#   nccl    HOROVOD_GPU_OPERATIONS=NCCL, what the Dockerfile builds: gradients
#           are allreduced on the GPU; one rank per GPU.
#   staged  no GPU operations: Horovod copies CUDA tensors to host memory for
#           its Gloo/MPI allreduce; ranks may share a GPU, so DBS's multi-rank
#           behaviour can be checked on a machine with one GPU.
# Each step has a time limit; a flavour that fails to build is reported and the
# other one still runs. Everything lands in OUT_DIR (build logs, env.txt,
# check-build and pytest output per flavour).
#
# Usage: launch/gpu_check.sh [OUT_DIR]
# Horovod's setup.py needs cffi at build time: offline, have it installed first
# (or put its wheels, with pycparser's, in WHEELS_DIR).
# Environment: PYTHON (default python3, the one with CUDA torch), HOROVOD_SDIST
#   (horovod-0.28.1.tar.gz on disk; default: download), FLAVOURS (default
#   "staged nccl"), BUILD_TIMEOUT (s, default 420), TEST_TIMEOUT (s, default 240).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-/tmp/gpu_check}}
py=${PYTHON:-python3}
flavours=${FLAVOURS:-staged nccl}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi -L || true
    "$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
    command -v nvcc && nvcc --version | tail -1
    cmake --version | head -1 || true
    g++ --version | head -1 || true
    command -v mpirun || echo "no mpirun: Horovod is built with Gloo only"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

if ! "$py" -c 'import cffi' 2>/dev/null && [[ -n ${WHEELS_DIR:-} ]]; then
    "$py" -m pip install --quiet --no-index --find-links "$WHEELS_DIR" cffi
fi
cc=$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')
common_env=(HOROVOD_BUILD_CUDA_CC_LIST="$cc" MAKEFLAGS="-j$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))")
nvcc_path=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
common_env+=(HOROVOD_CUDA_HOME="$(dirname "$(dirname "$nvcc_path")")")
command -v mpicc >/dev/null || common_env+=(HOROVOD_WITHOUT_MPI=1)  # no MPI headers to build with

nccl_env() {
    # torch's pip NCCL: headers and libnccl.so.2, but no unversioned libnccl.so to link.
    local header
    local site_dirs
    read -r -a site_dirs < <("$py" -c 'import site; print(*site.getsitepackages())')
    header=$(find "${site_dirs[@]}" /usr/include /usr/local/cuda/include -name nccl.h \
             2>/dev/null | head -1 || true)
    [[ -n $header ]] || { echo "no nccl.h found" >&2; return 1; }
    local library
    library=$(find "$(dirname "$(dirname "$header")")" /usr/lib /usr/local -name 'libnccl.so*' \
              2>/dev/null | head -1 || true)
    [[ -n $library ]] || { echo "no libnccl.so found" >&2; return 1; }
    mkdir -p /tmp/nccl-link
    ln -sf "$library" /tmp/nccl-link/libnccl.so
    echo HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED \
         HOROVOD_NCCL_INCLUDE="$(dirname "$header")" HOROVOD_NCCL_LIB=/tmp/nccl-link
}

build() {  # build FLAVOUR: wheel into /tmp/hvd-FLAVOUR-wheel, installed into /tmp/hvd-FLAVOUR
    local flavour=$1 extra=()
    if [[ $flavour == nccl ]]; then
        read -r -a extra < <(nccl_env) || return 1
    fi
    env "${common_env[@]}" "${extra[@]}" timeout "${BUILD_TIMEOUT:-420}" \
        bash "$repo/launch/build_horovod.sh" "$py" "/tmp/hvd-$flavour-wheel" &&
        "$py" -m pip install --quiet --no-deps --target "/tmp/hvd-$flavour" \
            /tmp/hvd-"$flavour"-wheel/horovod-*.whl
}

declare -A pids
for flavour in $flavours; do
    build "$flavour" >"$out/build-$flavour.log" 2>&1 &
    pids[$flavour]=$!
done

status=0
for flavour in $flavours; do
    if ! wait "${pids[$flavour]}"; then
        echo "== $flavour: Horovod build FAILED (tail of build-$flavour.log)"
        tail -25 "$out/build-$flavour.log"
        status=1
        continue
    fi
    echo "== $flavour: built"
    rc=0
    (
        export PYTHONPATH="/tmp/hvd-$flavour:$repo" PATH="/tmp/hvd-$flavour/bin:$PATH"
        horovodrun --check-build
        cd "$repo" && timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest -v -s -rs -p no:cacheprovider \
            tests/test_gpu.py tests/test_devices.py
    ) >"$out/test-$flavour.log" 2>&1 || rc=$?
    grep -E "\[X\]|\[ \]|PASSED|FAILED|SKIPPED|ERROR|passed|failed|epoch +[0-9]" \
        "$out/test-$flavour.log" | tail -60 || true
    echo "== $flavour: tests exit $rc"
    [[ $rc == 0 ]] || status=1
done
exit $status
