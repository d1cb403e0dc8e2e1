#!/usr/bin/env bash
# Host discovery script for elastic Horovod: prints the hosts that may run
# workers right now, one "host:slots" per line.
#
# usage: discover_hosts.sh          (no arguments; configured by environment)
#
#   horovodrun -np 3 --min-np 2 --max-np 3 \
#       --host-discovery-script launch/discover_hosts.sh \
#       --start-timeout 60 --elastic-timeout 60 --blacklist-cooldown-range 60 300 \
#       .venv/bin/dbs-train --elastic --commit-every 10 ...
#
# (No "--" before the command in elastic mode: Horovod passes it on to the shell.
# Without the timeouts the driver waits 600 s for workers and ignores SIGTERM.
# Across hosts, add --network-interfaces IFACE and ssh keepalives, e.g.
# PATH=$PWD/launch/ssh_keepalive:$PATH: without them a host whose link is cut
# is never noticed. See docs/deployment/multi-host.md.)
#
# horovodrun runs this script every few seconds and adds or removes workers as
# its output changes. Where the hosts come from (the first that is set):
#   DBS_HVD_HOSTS       "h1:4,h2:4" (commas or newlines between hosts);
#   DBS_HVD_HOSTS_FILE  a file with one host per line, as "host:slots", "host slots=N"
#                       (so launch/hostfile.example works) or a bare "host" (1 slot);
#                       '#' comments. It is read at every call: edit it to grow or
#                       shrink a running job (a cluster scheduler or cloud API
#                       query would replace this in production);
#   default             localhost:2 and 127.0.0.1:1.
# Why that default: both names are this machine, and horovodrun starts workers
# on local names without ssh, so one machine can act as a two-host cluster with
# 3 slots; dropping a line makes Horovod remove that "host" mid-run.
#
# Exit status: 0 with the hosts on stdout (none = no host available now);
# 1 if the hosts file cannot be read or a line is malformed (horovodrun aborts
# when the first call fails and retries later ones). Messages go to stderr only:
# every stdout line is read as a host.
#
# Horovod's elastic mode refuses fewer than 2 hosts, hence the two local names
# by default. A failed worker's host is blacklisted for the cooldown range; with
# the default, killing the rank on 127.0.0.1 leaves the 2 ranks on localhost
# (tests/test_elastic.py does exactly that).
set -euo pipefail

die() { echo "discover_hosts.sh: $*" >&2; exit 1; }

emit() {  # emit LINE: print one host as host:slots, or nothing for a blank line
    local line=$1 name rest slots
    line=${line%%#*}
    read -r name rest <<<"$line" || true
    [ -n "${name:-}" ] || return 0
    if [[ "$name" =~ ^([^:[:space:]]+):([0-9]+)$ ]]; then
        name=${BASH_REMATCH[1]}
        slots=${BASH_REMATCH[2]}
    elif [[ "${rest:-}" =~ (^|[[:space:]])slots=([0-9]+) ]]; then
        slots=${BASH_REMATCH[2]}
    elif [ -z "${rest:-}" ] && [[ "$name" != *:* ]]; then
        slots=1
    else
        die "cannot read '$1' as host:slots or 'host slots=N'"
    fi
    slots=$((10#$slots))  # "08" is 8, not an octal error
    ((slots >= 1)) || die "host $name has $slots slots"
    echo "$name:$slots"
}

if [ -n "${DBS_HVD_HOSTS:-}" ]; then
    source_text=${DBS_HVD_HOSTS//,/$'\n'}
elif [ -n "${DBS_HVD_HOSTS_FILE:-}" ]; then
    [ -r "$DBS_HVD_HOSTS_FILE" ] || die "cannot read DBS_HVD_HOSTS_FILE=$DBS_HVD_HOSTS_FILE"
    source_text=$(<"$DBS_HVD_HOSTS_FILE")
else
    source_text=$'localhost:2\n127.0.0.1:1'
fi

# Build the whole answer first, so a malformed line prints no partial list.
out=""
while IFS= read -r line || [ -n "$line" ]; do
    host=$(emit "$line")
    [ -z "$host" ] || out+="$host"$'\n'
done <<<"$source_text"
printf '%s' "$out"
