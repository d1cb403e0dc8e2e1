#!/usr/bin/env bash
# Build a Horovod 0.28.1 wheel that works with today's torch.
#
# Why this script exists: the last Horovod release (0.28.1) pins C++14 in its
# CMake files, but torch >= 2.1 headers need C++17 and torch >= 2.14 headers
# C++20. Raising the standard in *both* CMakeLists.txt files (top level and
# horovod/torch) builds and links; raising only the torch one fails to link
# (gloo's kDefaultTimeout is defined twice). The standard is read off the
# installed torch's headers (ATen/ATen.h states the one it needs). The build
# must see the installed torch, hence --no-build-isolation.
#
# A CPU build (no HOROVOD_GPU_* set) against a CUDA build of torch: Horovod's
# CMake turns GPU support on whenever torch was built with CUDA and a CUDA
# compiler is found, and then fails without the CUDA toolkit's libraries; here
# it is told that torch has no CUDA, so it builds the MPI and Gloo CPU ops only.
#
# Shared by the CPU installer (launch/install.sh) and the GPU Dockerfile, so
# the fix lives in one place.
#
# Usage: build_horovod.sh PYTHON OUT_DIR
#   PYTHON   interpreter whose site-packages hold torch (and will hold horovod)
#   OUT_DIR  where the wheel is written
# Environment: HOROVOD_GPU_OPERATIONS=NCCL (etc.) is passed through for GPU builds;
#   HOROVOD_VERSION (default 0.28.1), HOROVOD_CXX_STANDARD (default: what the
#     installed torch's headers need, 17 or 20);
#   HOROVOD_SDIST: a horovod-VERSION.tar.gz already on disk, for machines that
#     cannot reach PyPI (default: download it);
#   HOROVOD_WITHOUT_MPI=1: Gloo only, for machines without an MPI library
#     (CPU operations then default to GLOO instead of MPI).
set -euo pipefail

python=${1:?usage: build_horovod.sh PYTHON OUT_DIR}
out_dir=${2:?usage: build_horovod.sh PYTHON OUT_DIR}
version=${HOROVOD_VERSION:-0.28.1}
# The C++ standard torch's headers ask for: ATen/ATen.h stops the build below
# it with `#if ... __cplusplus < 202002L` (torch 2.14 and 2.15; 201703L before).
torch_cxx_standard() {
    "$python" - <<'PY'
import pathlib, re, torch
header = pathlib.Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
text = header.read_text() if header.exists() else ""
need = max([int(y) for y in re.findall(r"__cplusplus\s*<\s*(\d{6})L", text)] + [201703])
print(str(need)[2:4])  # 201703 -> 17, 202002 -> 20
PY
}
cxx_standard=${HOROVOD_CXX_STANDARD:-$(torch_cxx_standard)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ -n ${HOROVOD_SDIST:-} ]]; then
    cp "$HOROVOD_SDIST" "$work/horovod-$version.tar.gz"
else
    "$python" -m pip download --quiet --no-deps --no-binary :all: "horovod==$version" -d "$work"
fi
tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
src="$work/horovod-$version"

# replace FILE OLD NEW: a literal replacement; OLD must be there, or the Horovod
# source has changed and the patch needs a person's review.
replace() {
    if ! grep -qF "$2" "$1"; then
        echo "build_horovod: expected '$2' in $1; the Horovod source changed," \
             "review this patch" >&2
        exit 1
    fi
    "$python" - "$@" <<'PY'
import pathlib, sys
path, old, new = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
path.write_text(path.read_text().replace(old, new))
PY
}

for cmake_file in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    replace "$cmake_file" 'set(CMAKE_CXX_STANDARD 14)' "set(CMAKE_CXX_STANDARD $cxx_standard)"
done
# Horovod's CUDA kernels ask nvcc for C++11, which CUDA 13's headers (CCCL 3)
# do not support; the kernels build with the C++ standard used above (seen with
# nvcc 13.0). Only GPU builds compile this directory.
replace "$src/horovod/common/ops/cuda/CMakeLists.txt" \
    'set(CMAKE_CUDA_STANDARD 11)' "set(CMAKE_CUDA_STANDARD $cxx_standard)"
# The torch CMake file asks distutils (removed in Python 3.12) for the Python
# include folder; sysconfig gives the same folder on every Python 3.
replace "$src/horovod/torch/CMakeLists.txt" \
    'from distutils.sysconfig import get_python_inc; print(get_python_inc())' \
    "import sysconfig; print(sysconfig.get_path('include'))"

# CPU build: torch's CUDA is not Horovod's to use (see the header).
if [[ -z ${HOROVOD_GPU_OPERATIONS:-}${HOROVOD_GPU_ALLREDUCE:-}${HOROVOD_GPU:-} ]]; then
    replace "$src/cmake/Modules/FindPytorch.cmake" \
        'print(True if ((torch.version.cuda is not None) and (CUDA_HOME is not None)) else False)' \
        'print(False)'
fi

# GCC 13 no longer pulls <string>, <stdexcept> and <cstdint> in through other
# standard headers, which Horovod 0.28.1 relied on (group_table.h, common.h);
# including them up front is harmless for older compilers.
export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string -include stdexcept"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
if [[ ${HOROVOD_WITHOUT_MPI:-} == 1 ]]; then
    export HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-GLOO}
else
    export HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI}
fi
export MAKEFLAGS=${MAKEFLAGS:--j"$(nproc)"}
# cmake 4 rejects gloo's ancient cmake_minimum_required; harmless for cmake 3.
export CMAKE_POLICY_VERSION_MINIMUM=3.5

mkdir -p "$out_dir"
"$python" -m pip wheel --no-build-isolation --no-deps -w "$out_dir" "$src"
