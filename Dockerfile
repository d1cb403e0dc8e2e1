# GPU image for dbs_hvd: CUDA 12.6 + NCCL, Ubuntu's Open MPI, torch 2.13.0+cu126,
# Horovod 0.28.1 built with NCCL by launch/build_horovod.sh, and dbs_hvd itself.
#
#   docker build -t dbs-hvd:gpu .
#   docker run --rm dbs-hvd:gpu                                  # dbs-train --help
#   docker run --rm --gpus all --ipc=host --shm-size=1g -v "$PWD/runs:/workspace/runs" \
#       dbs-hvd:gpu horovodrun -np 4 -H localhost:4 -- dbs-train --epochs 3 --log runs/gpu.jsonl
#   docker run --rm dbs-hvd:gpu horovodrun --check-build         # NCCL, MPI, Gloo, PyTorch
#
# Multi-host: the same image on every host, started with --network=host; then
# launch/multi_host.sh (horovodrun/mpirun over ssh) or launch/slurm.sbatch (srun).
#
# WHAT WAS AND WAS NOT VERIFIED
#   Verified where this file was written (no Docker engine and no GPU there):
#     * `hadolint Dockerfile` passes (tests/test_deploy.py runs it on every test run);
#     * launch/build_horovod.sh, which this file reuses, builds a working Horovod
#       (PyTorch, MPI, Gloo) against torch 2.13.0 CPU on Debian (launch/install.sh);
#     * the --check-build test below was run against that CPU build's report: it
#       accepts PyTorch/MPI/Gloo and stops at the missing NCCL, as it should;
#     * the package and version facts the choices below rest on were looked up:
#       torch 2.13.0 ships CUDA 12.6 and 13.0 wheels (PyTorch RELEASE.md), the
#       12.6.3 image tag is in wide use, Ubuntu 22.04 offers Python 3.11 only as a
#       3.11.0~rc1 build, Horovod 0.28.1's CMake finds NCCL in /usr/include and
#       /usr/lib/x86_64-linux-gnu and decides CUDA support from torch.version.cuda
#       (so no GPU is needed at build time).
#   Verified on a lent GPU machine (H100, CUDA 13.0, torch 2.11, GCC 13, offline;
#     benchmarks/results/gpu_check.md): launch/build_horovod.sh with HOROVOD_GPU_OPERATIONS=NCCL,
#     HOROVOD_NCCL_LINK=SHARED builds Horovod's CUDA kernels and NCCL ops, the
#     --check-build report lists NCCL, and `dbs-train --device cuda` trains with
#     the same losses as on the CPU (tests/test_gpu.py, run by launch/gpu_check.sh).
#   NOT verified: this image has never been built or run. In particular nobody has
#     seen nvcc 12.6 compile Horovod's kernels, NCCL allreduce across two GPUs
#     (one GPU was lent), or the torch cu126 wheel resolve from download.pytorch.org.
#     The build fails loudly (RUN checks below) rather than producing a CPU-only Horovod.
#   The first person who builds it: run `horovodrun --check-build` and a 2-GPU
#     `horovodrun -np 2 -H localhost:2 -- dbs-train --device cuda --epochs 1`, then
#     update this note.

# Base: CUDA 12.6 "devel" (nvcc for Horovod's CUDA kernels; libnccl2 + libnccl-dev).
# Why 12.6 and not 13.0: torch 2.13.0 has wheels for both, but CUDA 13 needs an
# R580+ driver while 12.6 runs on R525+ drivers (CUDA 12 minor-version
# compatibility), which most clusters have; and Horovod 0.28.1 (2023) predates
# CUDA 13. Why not the -cudnn- variant: the torch wheel brings its own cuDNN,
# so the image's copy would be 1 GB of dead weight.
# Pinned by tag; pin by digest too (FROM ...@sha256:...) once you have pulled it.
FROM nvidia/cuda:12.6.3-devel-ubuntu22.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# System packages. Python: Ubuntu 22.04's python3 (3.10) + venv, because 22.04's
# python3.11 package is a 3.11.0 release candidate; torch 2.13.0 supports 3.10.
# (Horovod's distutils call, gone in 3.12, is patched by build_horovod.sh, which
# built on Python 3.12 on the GPU check machine.) Open MPI 4.1 from
# the distro (Horovod's MPI controller and mpi4py link against it). ssh client:
# horovodrun/mpirun start remote ranks over ssh (the sshd side is deployment
# specific and not set up here; srun needs neither).
# NCCL: the CUDA devel image ships libnccl2/libnccl-dev; install them from the
# CUDA apt repo the image already configures only if a future base lacks them.
# Why DL3008 (pin apt versions) is ignored: Ubuntu and NVIDIA's repo remove
# superseded versions, so exact pins break every rebuild after the next security
# update; the pinned base tag already fixes the Ubuntu and CUDA releases.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 python3-venv python3-dev \
        openmpi-bin libopenmpi-dev \
        openssh-client \
        cmake g++ make \
    && if [ ! -e /usr/include/nccl.h ]; then \
        apt-get install -y --no-install-recommends libnccl2 libnccl-dev; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && test -e /usr/include/nccl.h

# A venv rather than the system site-packages: pip must not fight apt, and it
# mirrors the .venv layout launch/install.sh builds on CPU machines.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 wheel==0.48.0

# torch from PyTorch's CUDA 12.6 index (the default PyPI wheel is CUDA 13.0).
# The check stops the build if a CPU-only torch slipped in: Horovod would then
# build without GPU support.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.version.cuda, 'torch has no CUDA: ' + torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# mpi4py built from source against the distro Open MPI (same as launch/install.sh):
# a binary wheel could carry another MPI and clash with Horovod's.
RUN pip install --no-cache-dir --no-binary mpi4py mpi4py==4.1.2

# Horovod: the very script the CPU installer uses (C++ standard patch, PyTorch + MPI +
# Gloo), with GPU settings passed through the environment (cffi first: Horovod's
# setup.py needs it to build):
#   HOROVOD_GPU_OPERATIONS=NCCL  allreduce/allgather/broadcast on GPU tensors via NCCL;
#   HOROVOD_NCCL_LINK=SHARED     link libnccl.so.2 dynamically: torch has already
#                                loaded its own libnccl.so.2 when horovod.torch is
#                                imported, so the process runs one NCCL, not two;
#   HOROVOD_BUILD_CUDA_CC_LIST   GPU architectures for Horovod's few CUDA kernels
#                                (Volta..Hopper; the last one also as PTX for newer GPUs).
# The wheel is installed without dependencies so that pip cannot touch torch,
# then Horovod's runtime dependencies are added (as in launch/install.sh).
COPY launch/build_horovod.sh /opt/dbs_hvd/launch/build_horovod.sh
ARG HOROVOD_BUILD_CUDA_CC_LIST=70,75,80,86,89,90
RUN pip install --no-cache-dir cffi==2.1.1 \
    && HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_CUDA_HOME=/usr/local/cuda \
    HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST}" \
    bash /opt/dbs_hvd/launch/build_horovod.sh "$VIRTUAL_ENV/bin/python" /tmp/horovod-wheel \
    && pip install --no-cache-dir --no-deps /tmp/horovod-wheel/horovod-*.whl \
    && pip install --no-cache-dir \
        cloudpickle==3.1.3 psutil==7.2.2 pyyaml==6.0.4 packaging==26.4 \
    && rm -rf /tmp/horovod-wheel /root/.cache/pip

# Fail the build, with the report, unless Horovod has PyTorch, NCCL, MPI and Gloo.
RUN report=$(horovodrun --check-build) \
    && echo "$report" \
    && for want in PyTorch NCCL MPI Gloo; do \
        case "$report" in \
            *"[X] $want"*) ;; \
            *) echo "Horovod was built without $want" >&2; exit 1 ;; \
        esac; \
    done

# The project last: editing it does not rebuild Horovod. Only what the package
# needs is copied (the build context may hold a .venv and run logs).
WORKDIR /opt/dbs_hvd
COPY setup.py setup.cfg README.md ./
COPY dbs_hvd ./dbs_hvd
COPY launch ./launch
RUN pip install --no-cache-dir --no-build-isolation . \
    && python -c "import torch, mpi4py, horovod.torch as hvd, dbs_hvd; assert hvd.nccl_built()" \
    && dbs-train --help >/dev/null \
    && ln -s "$(python -m dbs_hvd.preload)" /opt/dbs_hvd/libquiet_yield.so

# Every process preloads dbs_hvd's sched_yield (dbs_hvd/quiet_yield.py), and Open
# MPI yields while it waits: in a container run with a CPU limit (--cpus), a rank
# then sleeps in MPI waits instead of polling its quota away. Without a limit the
# library passes sched_yield through.
ENV LD_PRELOAD=/opt/dbs_hvd/libquiet_yield.so \
    OMPI_MCA_mpi_yield_when_idle=1

# Containers usually run as root: let Open MPI accept that, and turn off its
# single-copy shared-memory path (CMA), which the default seccomp profile blocks.
ENV OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none

# Mount a host folder here for --log files and data sets.
WORKDIR /workspace

# Run whatever command is given (`docker run IMAGE horovodrun ...`, `... mpirun ...`,
# `... dbs-train ...`, `... bash`), found on PATH (the venv comes first); with
# no command, print dbs-train's help. env also accepts NAME=value words first.
ENTRYPOINT ["/usr/bin/env", "--"]
CMD ["dbs-train", "--help"]
