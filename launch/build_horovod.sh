#!/usr/bin/env bash
# Build a Horovod 0.28.1 wheel that works with today's torch.
#
# Why this script exists: the last Horovod release (0.28.1) pins C++14 in its
# CMake files, but torch >= 2.1 headers need C++17. Raising the standard in
# *both* CMakeLists.txt files (top level and horovod/torch) builds and links;
# raising only the torch one fails to link (gloo's kDefaultTimeout is defined
# twice). The build must see the installed torch, hence --no-build-isolation.
#
# Shared by the CPU installer (launch/install.sh) and the GPU Dockerfile, so
# the fix lives in one place.
#
# Usage: build_horovod.sh PYTHON OUT_DIR
#   PYTHON   interpreter whose site-packages hold torch (and will hold horovod)
#   OUT_DIR  where the wheel is written
# Environment: HOROVOD_GPU_OPERATIONS=NCCL (etc.) is passed through for GPU builds;
#   HOROVOD_VERSION (default 0.28.1), HOROVOD_CXX_STANDARD (default 17).
set -euo pipefail

python=${1:?usage: build_horovod.sh PYTHON OUT_DIR}
out_dir=${2:?usage: build_horovod.sh PYTHON OUT_DIR}
version=${HOROVOD_VERSION:-0.28.1}
cxx_standard=${HOROVOD_CXX_STANDARD:-17}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --no-binary :all: "horovod==$version" -d "$work"
tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
src="$work/horovod-$version"

for cmake_file in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    if ! grep -q 'set(CMAKE_CXX_STANDARD 14)' "$cmake_file"; then
        echo "build_horovod: expected 'set(CMAKE_CXX_STANDARD 14)' in $cmake_file;" \
             "the Horovod source changed, review this patch" >&2
        exit 1
    fi
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $cxx_standard)/" "$cmake_file"
done

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI}
export MAKEFLAGS=${MAKEFLAGS:--j"$(nproc)"}
# cmake 4 rejects gloo's ancient cmake_minimum_required; harmless for cmake 3.
export CMAKE_POLICY_VERSION_MINIMUM=3.5

mkdir -p "$out_dir"
"$python" -m pip wheel --no-build-isolation --no-deps -w "$out_dir" "$src"
