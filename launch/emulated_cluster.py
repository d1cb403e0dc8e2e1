#!/usr/bin/env python3
"""An emulated cluster on one Linux machine: hosts as network namespaces.

usage (as root):
  emulated_cluster.py up N [--decoy] [--prefix P] [--subnet 10.77.0] [--sshd DIR] [--slurm]
  emulated_cluster.py down
  emulated_cluster.py status
  emulated_cluster.py slow HOST --rate R [--delay-ms D]   (R as tc spells it: 20mbit)
  emulated_cluster.py cut HOST [--mode down|drop]
  emulated_cluster.py heal HOST
  emulated_cluster.py exec HOST -- CMD...                 (run CMD on HOST)

What ``up N`` builds (hosts named P1..PN, default dbsh1..dbsh3):

* a namespace per host, with one interface ``eth0`` (10.77.0.11, .12, ...) whose
  other end is a port of a bridge that lives in a namespace of its own (Pnet),
  so the machine's own namespace gets no address on the subnet and nothing is
  routed anywhere else;
* /etc/netns/HOST/hosts (``ip netns exec`` mounts it over /etc/hosts): every
  host name resolves to its address on the bridge, on every host;
* an rsh agent, ``ssh`` in the state folder's bin/ (printed by ``up``), with
  ssh's calling convention (``ssh [options] HOST CMD...``). It runs CMD in HOST's
  namespace under ``unshare --uts`` with the hostname set to HOST, from a clean
  environment like an ssh login. Put that bin/ first on PATH and mpirun,
  horovodrun (Gloo and MPI) and their own ssh checks go through it; or give it
  to Open MPI as ``--mca plm_rsh_agent``. Launch from a host
  (``exec dbsh1 -- mpirun ...``), as one would from a cluster's login node;
* ``--decoy``: on every host a second interface ``docker0`` with the same
  address, 172.17.0.1/16, as docker leaves on real machines (a launcher that
  picks it hangs or fails; see docs/deployment/multi-host.md);
* ``--slurm``: a Slurm cluster on the hosts (Debian's slurmctld, slurmd,
  slurm-client and munge packages): munged and slurmctld on the first host, a
  slurmd on every host under its own NodeName, one partition of all hosts.
  ``up`` prints the SLURM_CONF that sbatch, srun and sinfo need; submit from
  a host (``exec dbsh1 -- sbatch ...``).

Faults, on one host's link (both directions):

* ``slow``: a tbf rate limit; ``--delay-ms`` adds a userspace delay line (the
  kernel here has no netem): the host's bridge port is unplugged and a relay
  process in the bridge namespace copies each frame across after D ms;
* ``cut --mode down``: the host's eth0 goes down (its own sends fail at once,
  the others hear nothing); ``cut --mode drop``: the host's port is taken off
  the bridge, every frame is silently lost on both sides and both ends keep
  their link up (what a dead switch port or a firewall that drops looks like);
* ``heal``: undoes slow and cut.

Everything created is recorded in a state file *before* it is created, so
``down`` cleans up after a crash as well: it kills every process left in the
namespaces, deletes them and their /etc/netns folders, and stops the relays.
The hosts share the machine's file system and process table (one venv and
one repository serve every host, as a shared file system would).

Python standard library only; needs root, ``ip`` (iproute2), ``tc``, ``unshare``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("DBS_CLUSTER_STATE", "/run/dbs_hvd_cluster"))
STATE_FILE = STATE_DIR / "state.json"
NETNS_ETC = Path("/etc/netns")
DECOY_ADDRESS = "172.17.0.1/16"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ClusterError(RuntimeError):
    pass


def set_state_dir(path: str | os.PathLike) -> None:
    """Keep this cluster's state (and agent) in ``path``: tests use their own."""
    global STATE_DIR, STATE_FILE
    STATE_DIR = Path(path)
    STATE_FILE = STATE_DIR / "state.json"


# ---------------------------------------------------------------- state


def load_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        return None


def save_state(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, STATE_FILE)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def can_create_namespaces() -> str | None:
    """None when this process can build a cluster, else the reason it cannot."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "tc", "unshare"):
        if not any(Path(d, tool).exists() for d in CLEAN_PATH.split(":")):
            return f"{tool} not found"
    probe = f"dbsprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ---------------------------------------------------------------- up / down


def host_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n + 1)]


def up(n: int, prefix: str = "dbsh", subnet: str = "10.77.0", decoy: bool = False,
       sshd: str | None = None, slurm: bool = False) -> dict:
    if not 1 <= n <= 8:
        raise ClusterError("between 1 and 8 hosts")
    old = load_state()
    if old is not None and old.get("netns"):
        raise ClusterError(f"a cluster is already up ({', '.join(old['hosts'])}): run down first")
    hosts = host_names(prefix, n)
    bridge_ns = f"{prefix}net"
    addresses = {h: f"{subnet}.{10 + i}" for i, h in enumerate(hosts, 1)}
    taken = set(sh("ip", "netns", "list").stdout.split()) & {bridge_ns, *hosts}
    if taken:
        raise ClusterError(f"namespaces {', '.join(sorted(taken))} exist already "
                           "(another cluster with this --prefix?)")
    state = {"prefix": prefix, "subnet": subnet, "hosts": hosts, "addresses": addresses,
             "bridge_ns": bridge_ns, "netns": [], "etc": [], "relays": {}, "faults": {},
             "decoy": decoy, "bin": str(STATE_DIR / "bin"), "pid": os.getpid(),
             "daemons": {}}
    try:
        _record(state, "netns", bridge_ns)
        sh("ip", "netns", "add", bridge_ns)
        sh("ip", "-n", bridge_ns, "link", "set", "lo", "up")
        sh("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n" + "".join(
            f"{addresses[h]}\t{h}\n" for h in hosts)
        for host in hosts:
            _record(state, "netns", host)
            sh("ip", "netns", "add", host)
            sh("ip", "-n", host, "link", "set", "lo", "up")
            sh("ip", "link", "add", "eth0", "netns", host, "type", "veth",
               "peer", "name", port(host), "netns", bridge_ns)
            sh("ip", "-n", host, "addr", "add", f"{addresses[host]}/24", "dev", "eth0")
            sh("ip", "-n", host, "link", "set", "eth0", "up")
            sh("ip", "-n", bridge_ns, "link", "set", port(host), "master", "br0", "up")
            if decoy:  # same address on every host, reachable only from itself
                sh("ip", "-n", host, "link", "add", "docker0", "type", "veth",
                   "peer", "name", "docker0p")
                sh("ip", "-n", host, "addr", "add", DECOY_ADDRESS, "dev", "docker0")
                sh("ip", "-n", host, "link", "set", "docker0p", "up")
                sh("ip", "-n", host, "link", "set", "docker0", "up")
            etc = NETNS_ETC / host
            _record(state, "etc", str(etc))
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            (etc / "hostname").write_text(host + "\n")
        write_agent(state)
        save_state(state)
        wait_reachable(state)
        if sshd:
            start_sshd(state, sshd)
        if slurm:
            start_slurm(state)
    except BaseException:
        down(quiet=True)
        raise
    return state


def _record(state: dict, key: str, value: str) -> None:
    state[key].append(value)
    save_state(state)


def port(host: str) -> str:
    return f"v-{host}"[:15]


def write_agent(state: dict) -> Path:
    """bin/ssh: an rsh agent with ssh's calling convention into the namespaces."""
    bin_dir = Path(state["bin"])
    bin_dir.mkdir(parents=True, exist_ok=True)
    names = " ".join(state["hosts"])
    cases = "\n".join(f"        {h}|{a}) ns={h} ;;" for h, a in state["addresses"].items())
    script = f"""#!/bin/bash
# rsh agent of launch/emulated_cluster.py, with ssh's calling convention:
#   ssh [options] HOST CMD...   runs CMD (the words joined, as ssh does) in
# HOST's network namespace, its hostname set to HOST (unshare --uts), from a
# clean environment like an ssh login's. Hosts: {names}
# Like ssh, options may also follow the host (horovodrun puts -p, -o there).
host=""
while (($#)); do
    case "$1" in
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;   # ssh options that take a value
        -[BbcDEeFIiJLlmOoPpQRSWw]?*) shift ;;  # ... glued to it
        --) shift; [ -n "$host" ] || {{ host=$1; shift; }}; break ;;
        -*) shift ;;
        *) [ -z "$host" ] || break; host=$1; shift ;;
    esac
done
host=${{host#*@}}
case "$host" in
{cases}
    *) echo "ssh: Could not resolve hostname $host: not a host of the emulated cluster" >&2; exit 255 ;;
esac
[ -e /run/netns/$ns ] || {{ echo "ssh: connect to host $host: No route to host" >&2; exit 255; }}
cmd="$*"
[ -n "$cmd" ] || cmd='exec bash -l'
exec ip netns exec "$ns" unshare --uts env -i HOME="${{HOME:-/root}}" USER="$(id -un)" \\
    LOGNAME="$(id -un)" SHELL=/bin/bash PATH={CLEAN_PATH} LANG=C.UTF-8 \\
    SSH_CONNECTION="emulated 0 $host 22" \\
    bash -c 'hostname "$1" && cd && exec bash -c "$2"' ssh-agent "$ns" "$cmd"
"""
    agent = bin_dir / "ssh"
    agent.write_text(script)
    agent.chmod(0o755)
    return agent


def start_sshd(state: dict, root: str) -> None:
    """An sshd on every host, listening on that host's address only; ssh set up for it.

    ``root`` is openssh-server's .deb unpacked (``dpkg -x``): installing the
    package would upgrade the machine's openssh-client and start a system sshd.
    One host key and one client key (in the state folder) serve every host; in
    the hosts' namespaces /etc/ssh is /etc/netns/HOST/ssh, whose ssh_config
    uses that key and trusts any host key, and /etc/passwd gains the ``sshd``
    user that privilege separation needs.
    """
    root_path = Path(root).resolve()
    binary = root_path / "usr" / "sbin" / "sshd"
    if not binary.exists():
        raise ClusterError(f"no usr/sbin/sshd under {root_path} (dpkg -x openssh-server_*.deb DIR)")
    libs = ":".join(str(p) for p in root_path.glob("**/x86_64-linux-gnu") if p.is_dir())
    keys = STATE_DIR / "ssh"
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("host_ed25519", "id_ed25519"):
        if not (keys / name).exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name))
    (keys / "authorized_keys").write_text((keys / "id_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)
    passwd = Path("/etc/passwd").read_text()
    if "\nsshd:" not in "\n" + passwd:
        passwd += "sshd:x:105:65534::/run/sshd:/usr/sbin/nologin\n"
    state["sshd"] = {}
    for host in state["hosts"]:
        etc = NETNS_ETC / host
        (etc / "passwd").write_text(passwd)
        (etc / "ssh").mkdir(exist_ok=True)
        (etc / "ssh" / "ssh_config").write_text(
            "Host *\n"
            f"    IdentityFile {keys / 'id_ed25519'}\n"
            "    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n"
            "    BatchMode yes\n")
        config = keys / f"sshd_config.{host}"
        config.write_text(
            f"ListenAddress {state['addresses'][host]}\n"
            f"HostKey {keys / 'host_ed25519'}\n"
            f"PidFile {keys / ('sshd.' + host + '.pid')}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "PermitRootLogin yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\n"
            "PrintMotd no\nPrintLastLog no\n"
            "SetEnv PATH=" + CLEAN_PATH + "\n")
        proc = subprocess.Popen(
            host_argv(host, [str(binary), "-D", "-e", "-f", str(config)]),
            env={**os.environ, "LD_LIBRARY_PATH": libs}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(keys / f"sshd.{host}.log", "w"),
            start_new_session=True)
        state["sshd"][host] = proc.pid
    save_state(state)
    deadline = time.monotonic() + 10
    for host in state["hosts"]:
        while sh("ip", "netns", "exec", host, "ssh", host, "true", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(f"sshd on {host} does not answer: see {keys}/sshd.{host}.log")
            time.sleep(0.2)


SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo")


def slurm_missing() -> str | None:
    """None when Slurm's daemons and commands are installed, else what is missing."""
    missing = [p for p in SLURM_PROGRAMS if not shutil.which(p, path=CLEAN_PATH)]
    if missing:
        return (f"{', '.join(missing)} not found (Debian: apt-get install slurmctld slurmd "
                "slurm-client munge)")
    return None


def slurm_conf(state: dict, folder: Path) -> str:
    """slurm.conf of the emulated hosts: root runs the daemons, no cgroups, no accounting."""
    hosts, addresses = state["hosts"], state["addresses"]
    cpus = os.cpu_count() or 1
    nodes = "".join(f"NodeName={h} NodeAddr={addresses[h]} CPUs={cpus} State=UNKNOWN\n"
                    for h in hosts)
    return (
        f"ClusterName={state['prefix']}\n"
        f"SlurmctldHost={hosts[0]}({addresses[hosts[0]]})\n"
        "SlurmUser=root\n"
        "AuthType=auth/munge\nCredType=cred/munge\n"
        f"AuthInfo=socket={folder / 'munge.sock'}\n"
        f"StateSaveLocation={folder / 'state'}\n"
        f"SlurmdSpoolDir={folder / 'spool' / '%n'}\n"
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}\n"
        f"SlurmdPidFile={folder / 'slurmd.%n.pid'}\n"
        f"SlurmctldLogFile={folder / 'slurmctld.log'}\n"
        f"SlurmdLogFile={folder / 'slurmd.%n.log'}\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
        "ReturnToService=2\nMpiDefault=none\n"
        "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
        "SlurmdTimeout=30\nInactiveLimit=0\nKillWait=5\n"
        + nodes +
        "PartitionName=emulated Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")


def start_slurm(state: dict, timeout: float = 30.0) -> None:
    """munged and slurmctld on the first host, a slurmd per host; returns once all are idle.

    The hosts share the machine's file system, so what a real host keeps to
    itself is kept per host here: each slurmd reads its own copy of the
    configuration, whose mpi.conf gives PMIx a client folder of that host
    (PMIx would otherwise create the same /tmp folder for a step on every
    host, and the second host's step fails). The one munged serves every host
    through its socket file. Slurm's cgroup plugin is told the machine's
    cgroup version (v1 here; autodetection fails where /sys/fs/cgroup is a
    tmpfs of v1 controllers), and tracks processes without cgroups.
    """
    missing = slurm_missing()
    if missing:
        raise ClusterError(f"--slurm: {missing}")
    folder = STATE_DIR / "slurm"
    if folder.exists():
        shutil.rmtree(folder)
    state["slurm"] = {"dir": str(folder), "conf": str(folder / "slurm.conf")}
    save_state(state)
    for sub in ("state", "spool", "tmp", "etc"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # munged wants its socket's folder searchable by all
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = slurm_conf(state, folder)
    cgroup = "CgroupPlugin=" + ("cgroup/v2" if _cgroup_v2() else "cgroup/v1") + "\nIgnoreSystemd=yes\n"
    (folder / "slurm.conf").write_text(conf)
    (folder / "cgroup.conf").write_text(cgroup)
    for host in state["hosts"]:
        etc = folder / "etc" / host
        etc.mkdir()
        (etc / "slurm.conf").write_text(conf)
        (etc / "cgroup.conf").write_text(cgroup)
        (folder / "tmp" / host).mkdir()
        (etc / "mpi.conf").write_text(f"PMIxCliTmpDirBase={folder / 'tmp' / host}\n")
        (folder / "spool" / host).mkdir()
    first = state["hosts"][0]
    daemons = [("munged", first, ["munged", "-F", "-f", f"--key-file={key}",
                                  f"--socket={folder / 'munge.sock'}",
                                  f"--pid-file={folder / 'munged.pid'}",
                                  f"--log-file={folder / 'munged.log'}",
                                  f"--seed-file={folder / 'munged.seed'}"]),
               ("slurmctld", first, ["slurmctld", "-D", "-f", str(folder / "slurm.conf")])]
    daemons += [(f"slurmd.{h}", h, ["slurmd", "-D", "-N", h, "-f",
                                     str(folder / "etc" / h / "slurm.conf")])
                for h in state["hosts"]]
    for name, host, argv in daemons:
        if name == "slurmctld":
            _wait_for(lambda: (folder / "munge.sock").exists(), 10, "munged", folder / "munged.out")
        proc = subprocess.Popen(
            host_argv(host, argv, env={"PATH": CLEAN_PATH}), stdin=subprocess.DEVNULL,
            stdout=open(folder / f"{name}.out", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        state["daemons"][name] = proc.pid
        save_state(state)
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def all_idle() -> bool:
        done = subprocess.run(host_argv(first, ["sinfo", "-h", "-N", "-o", "%N %T"]),
                              capture_output=True, text=True, env=env)
        states = dict(line.split()[:2] for line in done.stdout.splitlines() if line.strip())
        return sorted(states) == sorted(state["hosts"]) and all(
            s == "idle" for s in states.values())

    _wait_for(all_idle, timeout, "the slurmd of every host", folder / "slurmctld.log")


def _cgroup_v2() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


def _wait_for(ready, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:g} s: see {log}")
        time.sleep(0.3)


def wait_reachable(state: dict, timeout: float = 10.0) -> None:
    """Every host can open a TCP connection to every other (bridge ports learn)."""
    hosts = state["hosts"]
    if len(hosts) < 2:
        return
    first, others = hosts[0], [state["addresses"][h] for h in hosts[1:]]
    code = ("import socket,sys,time\n"
            "s=socket.socket(); s.bind(('0.0.0.0',0)); s.listen(8); print(s.getsockname()[1], flush=True)\n"
            f"for _ in range({len(others)}): s.accept()[0].close()\n")
    server = subprocess.Popen(["ip", "netns", "exec", first, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True)
    try:
        port_no = int(server.stdout.readline())
        for host in hosts[1:]:
            probe = (f"import socket,time\nd=time.time()+{timeout}\n"
                     "while True:\n"
                     "    try: socket.create_connection(('%s',%d),1).close(); break\n"
                     "    except OSError:\n"
                     "        if time.time()>d: raise\n"
                     "        time.sleep(0.1)\n") % (state["addresses"][first], port_no)
            sh("ip", "netns", "exec", host, sys.executable, "-c", probe)
        server.wait(timeout=timeout)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def namespace_pids(ns: str) -> list[int]:
    done = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split()]


def down(quiet: bool = False) -> list[str]:
    """Remove everything the state file lists; returns what was removed."""
    state = load_state()
    removed: list[str] = []
    if state is None:
        if not quiet:
            print("no emulated cluster is up")
        return removed
    for pid in [*state.get("relays", {}).values(), *state.get("daemons", {}).values()]:
        _kill(pid)
    for ns in state.get("netns", []):
        for _ in range(3):  # processes in the namespace; a launcher may restart some
            pids = namespace_pids(ns)
            if not pids:
                break
            for pid in pids:
                _kill(pid)
            time.sleep(0.2)
        if sh("ip", "netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    for etc in state.get("etc", []):
        path = Path(etc)
        if path.parent == NETNS_ETC and path.is_dir():
            shutil.rmtree(path)
    agent = Path(state.get("bin", STATE_DIR / "bin")) / "ssh"
    if agent.exists():
        agent.unlink()
    if state.get("slurm"):
        shutil.rmtree(state["slurm"]["dir"], ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    if not quiet:
        print("removed: " + (", ".join(removed) or "nothing"))
    return removed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- faults


def _host_state(host: str) -> dict:
    state = load_state()
    if state is None:
        raise ClusterError("no emulated cluster is up")
    if host not in state["hosts"]:
        raise ClusterError(f"{host} is not a host of the cluster ({', '.join(state['hosts'])})")
    return state


def slow(host: str, rate: str | None, delay_ms: float = 0.0) -> None:
    """Limit HOST's link to ``rate`` both ways (tbf), and delay it by ``delay_ms``."""
    state = _host_state(host)
    bridge_ns = state["bridge_ns"]
    if rate:
        for ns, dev in ((host, "eth0"), (bridge_ns, port(host))):
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", rate, "burst", "64kb", "latency", "500ms")
    _stop_relay(state, host)
    if delay_ms > 0:
        _start_relay(state, host, delay_ms)
    state["faults"][host] = {"rate": rate, "delay_ms": delay_ms}
    save_state(state)


def _relay_ports(host: str) -> tuple[str, str]:
    return f"d-{host}"[:15], f"e-{host}"[:15]


def _start_relay(state: dict, host: str, delay_ms: float) -> None:
    """Unplug HOST's bridge port and bridge it to br0 through a delaying relay."""
    bridge_ns = state["bridge_ns"]
    near, far = _relay_ports(host)
    sh("ip", "-n", bridge_ns, "link", "add", near, "type", "veth", "peer", "name", far)
    sh("ip", "-n", bridge_ns, "link", "set", far, "master", "br0", "up")
    sh("ip", "-n", bridge_ns, "link", "set", near, "up")
    sh("ip", "-n", bridge_ns, "link", "set", port(host), "nomaster")
    for ns in state["hosts"]:  # every host's frames may cross the delay line
        sh("ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "_csum_off", "eth0")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", bridge_ns, sys.executable, os.path.abspath(__file__),
         "_relay", port(host), near, str(delay_ms)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    state["relays"][host] = proc.pid
    save_state(state)


def _stop_relay(state: dict, host: str) -> None:
    pid = state["relays"].pop(host, None)
    if pid is None:
        return
    _kill(pid)
    bridge_ns = state["bridge_ns"]
    near, _ = _relay_ports(host)
    sh("ip", "-n", bridge_ns, "link", "del", near, check=False)
    sh("ip", "-n", bridge_ns, "link", "set", port(host), "master", "br0", "up", check=False)
    save_state(state)


def tx_checksum_off(dev: str) -> None:
    """ethtool -K DEV tx off, without ethtool (not installed here): SIOCETHTOOL.

    A frame a veth passes on carries only a partial TCP/UDP checksum (the
    receiver is trusted to need none); once the delay line copies it through a
    packet socket, the receiving host drops it. With transmit checksums off the
    kernel writes full checksums, and TSO goes too (it needs them), so frames
    fit the MTU.
    """
    import array
    import ctypes
    import fcntl
    import struct

    siocethtool, ethtool_stxcsum = 0x8946, 0x17
    value = array.array("I", [ethtool_stxcsum, 0])
    address, _ = value.buffer_info()
    ifreq = struct.pack("16sP", dev.encode(), address) + bytes(40 - 16 - ctypes.sizeof(ctypes.c_void_p))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), siocethtool, ifreq)


def relay(a: str, b: str, delay_ms: float) -> None:
    """Copy every frame between interfaces a and b after delay_ms (a delay line)."""
    import heapq
    import select

    socks = {}
    for name in (a, b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((name, 0))
        s.setblocking(False)
        socks[name] = s
    other = {a: socks[b], b: socks[a]}
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    delay = delay_ms / 1000.0
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:
                pass
        timeout = max(0.0, queue[0][0] - now) if queue else 1.0
        ready, _, _ = select.select(list(socks.values()), [], [], timeout)
        for s in ready:
            name = s.getsockname()[0]
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:
                    continue  # our own sends, seen again on the way out
                heapq.heappush(queue, (time.monotonic() + delay, seq, other[name], frame))
                seq += 1


def cut(host: str, mode: str = "down") -> None:
    state = _host_state(host)
    if mode == "down":
        sh("ip", "-n", host, "link", "set", "eth0", "down")
    elif mode == "drop":
        _stop_relay(state, host)
        sh("ip", "-n", state["bridge_ns"], "link", "set", port(host), "nomaster")
    else:
        raise ClusterError("--mode is down or drop")
    state["faults"][host] = {"cut": mode}
    save_state(state)


def heal(host: str) -> None:
    state = _host_state(host)
    bridge_ns = state["bridge_ns"]
    _stop_relay(state, host)
    for ns, dev in ((host, "eth0"), (bridge_ns, port(host))):
        sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
    sh("ip", "-n", host, "link", "set", "eth0", "up")
    sh("ip", "-n", bridge_ns, "link", "set", port(host), "master", "br0", "up")
    state["faults"].pop(host, None)
    save_state(state)


# ---------------------------------------------------------------- helpers for callers


def host_argv(host: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run on ``host``: its namespace and hostname, this process's environment."""
    prefix = ["ip", "netns", "exec", host, "unshare", "--uts", "sh", "-c",
              'hostname "$0" && exec "$@"', host]
    if env:
        prefix += ["env"] + [f"{k}={v}" for k, v in env.items()]
    return prefix + list(argv)


def agent_path() -> str:
    state = load_state()
    if state is None:
        raise ClusterError("no emulated cluster is up")
    return str(Path(state["bin"]) / "ssh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="create N hosts")
    p.add_argument("n", type=int)
    p.add_argument("--prefix", default="dbsh")
    p.add_argument("--subnet", default="10.77.0", help="the first three octets")
    p.add_argument("--decoy", action="store_true", help="docker0 172.17.0.1/16 on every host")
    p.add_argument("--sshd", metavar="DIR",
                   help="also an sshd per host, from openssh-server's .deb unpacked in DIR")
    p.add_argument("--slurm", action="store_true",
                   help="also Slurm: slurmctld and munged on the first host, a slurmd per host")
    sub.add_parser("down", help="remove the cluster (also after a crash)")
    sub.add_parser("status", help="print the state")
    p = sub.add_parser("slow", help="rate-limit and/or delay one host's link")
    p.add_argument("host")
    p.add_argument("--rate", help="tbf rate, e.g. 20mbit")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p = sub.add_parser("cut", help="cut one host's link")
    p.add_argument("host")
    p.add_argument("--mode", choices=["down", "drop"], default="down")
    p = sub.add_parser("heal", help="undo slow and cut")
    p.add_argument("host")
    p = sub.add_parser("exec", help="run a command on a host")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("_csum_off")  # internal: full checksums on a device
    p.add_argument("dev")
    p = sub.add_parser("_relay")  # internal: the delay line
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("delay_ms", type=float)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            reason = can_create_namespaces()
            if reason:
                raise ClusterError(reason)
            state = up(args.n, args.prefix, args.subnet, args.decoy, args.sshd, args.slurm)
            for h in state["hosts"]:
                print(f"{h}\t{state['addresses'][h]}")
            print(f"agent\t{state['bin']}/ssh   (PATH={state['bin']}:$PATH uses it as ssh)")
            if args.slurm:
                print(f"slurm\tSLURM_CONF={state['slurm']['conf']}   (sbatch, srun, sinfo)")
        elif args.cmd == "down":
            down()
        elif args.cmd == "status":
            print(json.dumps(load_state(), indent=1))
        elif args.cmd == "slow":
            if not args.rate and args.delay_ms <= 0:
                raise ClusterError("give --rate and/or --delay-ms")
            slow(args.host, args.rate, args.delay_ms)
        elif args.cmd == "cut":
            cut(args.host, args.mode)
        elif args.cmd == "heal":
            heal(args.host)
        elif args.cmd == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            _host_state(args.host)
            os.execvp("ip", host_argv(args.host, command or ["bash"]))
        elif args.cmd == "_csum_off":
            tx_checksum_off(args.dev)
        elif args.cmd == "_relay":
            relay(args.a, args.b, args.delay_ms)
    except ClusterError as error:
        print(f"emulated_cluster.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
