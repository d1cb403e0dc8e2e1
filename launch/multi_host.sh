#!/usr/bin/env bash
# Launch dbs-train across several hosts with horovodrun or mpirun.
#
# usage: multi_host.sh [--dry-run] [--launcher horovodrun|gloo|mpirun]
#                      (--hosts H1:N1,H2:N2 | --hostfile FILE) [--np N] [--nic IFACE]
#                      [--] [dbs-train flags...]
#
#   launch/multi_host.sh --hosts gpu1:4,gpu2:4 -- --model cnn --epochs 12
#     runs: horovodrun -np 8 -H gpu1:4,gpu2:4 -- dbs-train --model cnn --epochs 12
#   launch/multi_host.sh --launcher gloo --hosts gpu1:4,gpu2:4 -- --log run.jsonl
#     runs: horovodrun -np 8 -H gpu1:4,gpu2:4 --gloo bash -c 'exec dbs-train --log run.jsonl'
#   LAUNCHER=mpirun launch/multi_host.sh --hostfile launch/hostfile.example --dry-run
#     prints: mpirun -np 8 --hostfile launch/hostfile.example --bind-to none ... dbs-train
#
# Options (each also read from the environment variable in brackets; a flag wins):
#   --hosts     [HOSTS]     host:slots list, one slot per rank (one rank per GPU).
#                           A host without :slots gets one slot.
#   --hostfile  [HOSTFILE]  Open MPI style file, "host slots=N" per line, '#' comments
#                           (see launch/hostfile.example).
#   --launcher  [LAUNCHER]  horovodrun (default; Horovod's MPI controller where it has
#                           one), gloo (horovodrun --gloo; also horovodrun-gloo) or mpirun.
#   --np        [NP]        number of ranks; default: the sum of the slots.
#   --nic       [NIC]       network interface for MPI/Gloo and NCCL traffic (e.g. eth0,
#                           ib0), the same name on every host; default: the interface
#                           of this host's route to the first host that is not this one
#                           (said on stderr), or the launcher's choice when no host
#                           resolves. Why: an interface with the same address on every
#                           host (docker0's 172.17.0.1) lets a launcher pick an address
#                           that reaches the host itself, and the run hangs.
#   --dry-run   [DRY_RUN=1] print the command (shell-quoted, one line) and exit.
#   The program is $DBS_TRAIN (default: the venv's dbs-train when there is one, else
#   dbs-train on PATH); it must exist at that path on every host (same container
#   image, or the repo on a shared file system).
#
# Why a script: the two launchers spell hosts, interfaces and environment
# forwarding differently, and horovodrun's own --hostfile parser accepts no
# comments or blank lines; this reads the hosts once and writes both spellings.
# Both launchers start remote ranks over ssh: passwordless ssh from this host to
# every host is required (inside Slurm, prefer launch/slurm.sbatch with srun).
#
# A host that drops off the network must end the job, not hang it
# (docs/deployment/multi-host.md has the measured bounds):
#   [DBS_HVD_KEEPALIVE="10 5 3"]  Open MPI's daemons probe their TCP lifeline to
#       mpirun after 10 s idle, every 5 s, 3 times (the default is 300 + 9 x 20 s):
#       a lost host ends an mpirun job (also horovodrun's MPI mode) in about 30 s,
#       with "ORTE has lost communication with a remote daemon ... on node HOST",
#       and the lost host's daemon kills its own ranks. "0" leaves Open MPI's.
#   [DBS_HVD_SSH_KEEPALIVE="5 3"]  horovodrun (which runs ssh itself, with no
#       option for ssh's flags) gets ssh through launch/ssh_keepalive/ssh, which
#       adds -o ServerAliveInterval=5 -o ServerAliveCountMax=3: a dead link ends
#       that host's ssh session in about 15-20 s. "0" turns it off.
# Under horovodrun, dbs-train flags follow "--" (MPI) or go in one "bash -c"
# word (Gloo: horovodrun runs "env VARS CMD", where a "--" would be the program);
# either way horovodrun cannot take a dbs-train flag such as --log for its own.
set -euo pipefail

usage() {  # usage [EXIT_CODE]: the usage lines of the header comment
    sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    echo "(see the comments at the top of ${BASH_SOURCE[0]} for details)" >&2
    exit "${1:-2}"
}
die() { echo "multi_host.sh: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DBS_HVD_VENV:-$repo/.venv}
hosts=${HOSTS:-}
hostfile=${HOSTFILE:-}
launcher=${LAUNCHER:-horovodrun}
keepalive=${DBS_HVD_KEEPALIVE:-10 5 3}
ssh_keepalive=${DBS_HVD_SSH_KEEPALIVE:-5 3}
np=${NP:-}
nic=${NIC:-}
dry_run=${DRY_RUN:-0}

while (($#)); do
    case "$1" in
        --hosts|-H) (($# >= 2)) || usage; hosts=$2; hostfile=""; shift 2 ;;
        --hostfile) (($# >= 2)) || usage; hostfile=$2; hosts=""; shift 2 ;;
        --launcher) (($# >= 2)) || usage; launcher=$2; shift 2 ;;
        --np) (($# >= 2)) || usage; np=$2; shift 2 ;;
        --nic) (($# >= 2)) || usage; nic=$2; shift 2 ;;
        --dry-run|-n) dry_run=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) break ;;  # the first unknown word starts the dbs-train flags
    esac
done

if [ -n "${DBS_TRAIN:-}" ]; then
    program=$DBS_TRAIN
elif [ -x "$venv/bin/dbs-train" ]; then
    program=$venv/bin/dbs-train
else
    program=dbs-train
fi

# horovodrun: the venv's beside dbs-train, else the one on PATH.
horovodrun=horovodrun
if [ -z "${DBS_TRAIN:-}" ] && [ -x "$venv/bin/horovodrun" ] && ! command -v horovodrun >/dev/null; then
    horovodrun=$venv/bin/horovodrun
fi

# dbs_hvd's preloadable sched_yield (dbs_hvd/quiet_yield.py): with Open MPI's
# yield_when_idle, a rank under a CPU quota then sleeps in MPI waits instead of
# polling its quota away. The path must be the same on every host (as dbs-train's).
py=python3
[ ! -x "$venv/bin/python" ] || py=$venv/bin/python
preload=$("$py" -m dbs_hvd.preload 2>/dev/null) \
    || echo "multi_host.sh: dbs_hvd's sched_yield library not found ($py -m dbs_hvd.preload); MPI waits will poll" >&2

# Normalise the hosts to "host:slots" entries, from --hosts or from a hostfile.
entries=()
if [ -n "$hostfile" ]; then
    [ -r "$hostfile" ] || die "cannot read hostfile $hostfile"
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%%#*}  # comments, whole-line or trailing
        read -r name rest <<<"$line" || true
        [ -n "${name:-}" ] || continue
        slots=1
        if [[ "$rest" =~ (^|[[:space:]])slots=([0-9]+) ]]; then
            slots=${BASH_REMATCH[2]}
        fi
        entries+=("$name:$slots")
    done <"$hostfile"
elif [ -n "$hosts" ]; then
    IFS=, read -r -a parts <<<"$hosts"
    for part in "${parts[@]}"; do
        [ -n "$part" ] || continue
        case "$part" in
            *:*) entries+=("$part") ;;
            *) entries+=("$part:1") ;;
        esac
    done
else
    echo "multi_host.sh: give the hosts with --hosts H1:N1,H2:N2, --hostfile FILE, HOSTS or HOSTFILE" >&2
    usage
fi
((${#entries[@]})) || die "no hosts found in ${hostfile:-$hosts}"

total=0
for entry in "${entries[@]}"; do
    slots=${entry##*:}
    [[ "$slots" =~ ^[1-9][0-9]*$ ]] || die "bad slot count in '$entry' (want host:N, N >= 1)"
    total=$((total + slots))
done
np=${np:-$total}
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "--np must be a positive integer, got '$np'"
((np <= total)) || die "--np $np exceeds the $total slots of the hosts"
host_list=$(IFS=,; echo "${entries[*]}")

# The interface: the one this host routes the first other host through.
if [ -z "$nic" ]; then
    for entry in "${entries[@]}"; do
        name=${entry%:*}
        addr=$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 {print $1}') || true
        [ -n "$addr" ] || continue
        dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p') || true
        if [ -n "$dev" ] && [ "$dev" != lo ]; then
            nic=$dev
            echo "multi_host.sh: network interface $nic (this host's route to $name, $addr); --nic to choose another" >&2
            break
        fi
    done
fi

# Open MPI's lifeline keepalive: mpirun gets it as -mca flags, horovodrun's
# MPI mode through the environment (horovodrun passes it on to its mpirun).
read -r ka_time ka_intvl ka_probes <<<"$keepalive" || true
oob_keepalive=()
exported=()
if [ "${ka_time:-0}" != 0 ]; then
    oob_keepalive=(-mca oob_tcp_keepalive_time "$ka_time" -mca oob_tcp_keepalive_intvl "${ka_intvl:-5}"
                   -mca oob_tcp_keepalive_probes "${ka_probes:-3}")
fi

case "$launcher" in
    horovodrun|gloo|horovodrun-gloo)
        # horovodrun forwards this shell's environment to every rank itself.
        # Hosts always go as -H: its --hostfile parser rejects comment lines.
        cmd=("$horovodrun" -np "$np" -H "$host_list")
        [ -z "$nic" ] || cmd+=(--network-interfaces "$nic")
        if [ "$launcher" = horovodrun ]; then
            cmd+=(-- "$program" "$@")
            for ((i = 0; i < ${#oob_keepalive[@]}; i += 3)); do
                exported+=("OMPI_MCA_${oob_keepalive[i+1]}=${oob_keepalive[i+2]}")
            done
            [ -z "$preload" ] || exported+=("LD_PRELOAD=$preload" "OMPI_MCA_mpi_yield_when_idle=1")
        else
            printf -v line '%q ' "$program" "$@"
            cmd+=(--gloo bash -c "exec ${line% }")
        fi
        read -r ssh_interval ssh_count <<<"$ssh_keepalive" || true
        if [ "${ssh_interval:-0}" != 0 ]; then
            exported+=("DBS_HVD_SSH_KEEPALIVE=$ssh_interval ${ssh_count:-3}"
                       "PATH=$repo/launch/ssh_keepalive:$PATH")
        fi
        ;;
    mpirun)
        cmd=(mpirun -np "$np")
        if [ -n "$hostfile" ]; then
            cmd+=(--hostfile "$hostfile")
        else
            cmd+=(-H "$host_list")
        fi
        # One rank per slot, no core binding (the ranks run DataLoader workers and
        # NCCL threads), and the flags Horovod's own launcher uses with Open MPI:
        # ob1 point-to-point over TCP/shared memory instead of the openib BTL.
        cmd+=(--bind-to none --map-by slot -mca pml ob1 -mca btl '^openib' "${oob_keepalive[@]}")
        if [ -n "$nic" ]; then
            cmd+=(-mca btl_tcp_if_include "$nic" -mca oob_tcp_if_include "$nic" -x "NCCL_SOCKET_IFNAME=$nic")
        fi
        # mpirun passes no environment to remote ranks unless told: forward the
        # path and every NCCL_*/HOROVOD_* setting of this shell.
        cmd+=(-x PATH)
        [ -z "$preload" ] || cmd+=(-x "LD_PRELOAD=$preload" -x OMPI_MCA_mpi_yield_when_idle=1)
        for var in LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS $(compgen -e | grep -E '^(NCCL|HOROVOD)_' || true); do
            [ -z "${!var:-}" ] || cmd+=(-x "$var")
        done
        [ "$(id -u)" != 0 ] || cmd+=(--allow-run-as-root)
        cmd+=("$program" "$@")
        ;;
    *) die "--launcher must be gloo, horovodrun or mpirun, got '$launcher'" ;;
esac

# Shell-quote a word only when it needs it, so the dry run reads like what
# one would type (and can be pasted back into a shell).
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

if [ "$dry_run" = 1 ]; then
    for setting in "${exported[@]}"; do  # on stderr: stdout is the command alone
        echo "multi_host.sh: with ${setting/"$PATH"/\$PATH}" >&2
    done
    line=""
    for word in "${cmd[@]}"; do
        line+="${line:+ }$(quote "$word")"
    done
    echo "$line"
    exit 0
fi
for setting in "${exported[@]}"; do
    export "${setting?}"
done

# Run the launcher as a child (not exec) so that when the job fails, the hosts
# it can no longer reach are named, and a launcher that ignores SIGTERM is
# killed 30 s after it.
probe() {  # probe HOST: 0 when HOST answers a TCP connect (even a refusal)
    local addr
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [ -n "$addr" ] || return 0
    out=$(timeout 5 bash -c "exec 3<>/dev/tcp/$addr/${DBS_HVD_PROBE_PORT:-22}" 2>&1) && return 0
    # refused (no server on the port) still means the host is on the network
    [[ "$out" == *refused* ]]
}
# shellcheck disable=SC2329  # invoked by the trap below
stop() {
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$child" 2>/dev/null || return 0; sleep 1; done
    echo "multi_host.sh: ${cmd[0]} ignored SIGTERM for 30 s: killing it" >&2
    kill -KILL "$child" 2>/dev/null || true
}
"${cmd[@]}" <&0 &  # keep stdin (a background job would get /dev/null)
child=$!
trap 'stop' TERM INT HUP
while true; do
    set +e
    wait "$child"
    rc=$?
    set -e
    kill -0 "$child" 2>/dev/null || break  # a trap interrupted wait: wait again
done
if [ "$rc" != 0 ]; then
    for entry in "${entries[@]}"; do  # all at once: 5 s at most in all
        name=${entry%:*}
        probe "$name" || echo "multi_host.sh: the job failed (exit $rc) and host $name does not answer on the network: that host or its link is down" >&2 &
    done
    wait
fi
exit "$rc"
