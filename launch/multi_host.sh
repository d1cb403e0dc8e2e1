#!/usr/bin/env bash
# Launch dbs-train across several hosts with horovodrun or mpirun.
#
# usage: multi_host.sh [--dry-run] [--launcher horovodrun|mpirun]
#                      (--hosts H1:N1,H2:N2 | --hostfile FILE) [--np N] [--nic IFACE]
#                      [--] [dbs-train flags...]
#
#   launch/multi_host.sh --hosts gpu1:4,gpu2:4 -- --model cnn --epochs 12
#     runs: horovodrun -np 8 -H gpu1:4,gpu2:4 -- dbs-train --model cnn --epochs 12
#   LAUNCHER=mpirun launch/multi_host.sh --hostfile launch/hostfile.example --dry-run
#     prints: mpirun -np 8 --hostfile launch/hostfile.example --bind-to none ... dbs-train
#
# Options (each also read from the environment variable in brackets; a flag wins):
#   --hosts     [HOSTS]     host:slots list, one slot per rank (one rank per GPU).
#                           A host without :slots gets one slot.
#   --hostfile  [HOSTFILE]  Open MPI style file, "host slots=N" per line, '#' comments
#                           (see launch/hostfile.example).
#   --launcher  [LAUNCHER]  horovodrun (default) or mpirun.
#   --np        [NP]        number of ranks; default: the sum of the slots.
#   --nic       [NIC]       network interface for MPI/Gloo and NCCL traffic (e.g. eth0,
#                           ib0); default: let the launcher and NCCL pick.
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

case "$launcher" in
    horovodrun)
        # horovodrun forwards this shell's environment to every rank itself.
        # Hosts always go as -H: its --hostfile parser rejects comment lines.
        cmd=(horovodrun -np "$np" -H "$host_list")
        [ -z "$nic" ] || cmd+=(--network-interfaces "$nic")
        cmd+=(-- "$program" "$@")
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
        cmd+=(--bind-to none --map-by slot -mca pml ob1 -mca btl '^openib')
        if [ -n "$nic" ]; then
            cmd+=(-mca btl_tcp_if_include "$nic" -mca oob_tcp_if_include "$nic" -x "NCCL_SOCKET_IFNAME=$nic")
        fi
        # mpirun passes no environment to remote ranks unless told: forward the
        # path and every NCCL_*/HOROVOD_* setting of this shell.
        cmd+=(-x PATH)
        for var in LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS $(compgen -e | grep -E '^(NCCL|HOROVOD)_' || true); do
            [ -z "${!var:-}" ] || cmd+=(-x "$var")
        done
        [ "$(id -u)" != 0 ] || cmd+=(--allow-run-as-root)
        cmd+=("$program" "$@")
        ;;
    *) die "--launcher must be horovodrun or mpirun, got '$launcher'" ;;
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
    line=""
    for word in "${cmd[@]}"; do
        line+="${line:+ }$(quote "$word")"
    done
    echo "$line"
    exit 0
fi
exec "${cmd[@]}"
