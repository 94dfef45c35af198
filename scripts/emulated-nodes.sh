#!/usr/bin/env bash
# Runs an MPI job on emulated machines: one network namespace per "node", joined to a
# bridge by veth links rate-limited with tbf, so ranks on one node talk over that
# namespace's loopback and ranks on different nodes over the slow link. Addresses are
# in 198.18.0.0/15 (reserved for network benchmarks); nothing leaves the machine.
# Needs root, iproute2 and OpenMPI. Everything it creates is removed on exit.
#
#   scripts/emulated-nodes.sh [--nodes N] [--ranks-per-node K] [--rate 200mbit|none] [--round-robin]
#                             [--cpu FRACTION [--period-us US]] -- COMMAND...
#
# COMMAND is what every rank runs (e.g. target/release/ultramoe train --ep 4 ...); it is
# started by mpirun with K ranks in each of N namespaces, rank order node by node — or,
# with --round-robin, rank r on node r mod N (so that groups of consecutive ranks, such
# as expert-parallel groups, span the nodes). With --cpu, each rank also gets its own CPU
# quota, as in scripts/emulated-devices.sh (cgroup v1 cpu controller): a rank that waits
# cannot lend its share of the cores to the others, as on separate machines.
set -euo pipefail
nodes=2
per_node=2
rate=200mbit
map=slot
cpu=
period=100000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --round-robin) map=node; shift ;;
        --cpu) cpu=$2; shift 2 ;;
        --period-us) period=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --ranks-per-node) per_node=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--nodes N] [--ranks-per-node K] [--rate R] [--round-robin] -- COMMAND..." >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "$0: needs root (network namespaces)" >&2; exit 1; }

tag=um$$
bridge=${tag}br
work=$(mktemp -d)
# `ip netns exec` mounts a fresh /sys, so ranks reach their cgroups through a second
# mount of the cpu controller outside /sys.
cgroups=$work/cpu
groups=$cgroups/ultramoe-$$
cleanup() {
    for g in "$groups"/rank*; do
        [[ -d $g ]] || continue
        while read -r pid; do echo "$pid" > "$cgroups/cgroup.procs" 2>/dev/null || true; done < "$g/cgroup.procs"
        rmdir "$g" 2>/dev/null || true
    done
    rmdir "$groups" 2>/dev/null || true
    umount "$cgroups" 2>/dev/null || true
    for ((n = 0; n < nodes; n++)); do
        # an MPI daemon left behind in a node (it daemonises, so no signal to this
        # script's session reaches it) goes with its node
        ip netns pids "${tag}n$n" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del "${tag}n$n" 2>/dev/null || true
        ip link del "${tag}v$n" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

ip link add "$bridge" type bridge
ip addr add 198.18.0.1/24 dev "$bridge"
ip link set "$bridge" up
: > "$work/hosts"
for ((n = 0; n < nodes; n++)); do
    ns=${tag}n$n
    ip netns add "$ns"
    ip link add "${tag}v$n" type veth peer name eth0 netns "$ns"
    ip link set "${tag}v$n" master "$bridge" up
    ip -n "$ns" addr add "198.18.0.$((n + 10))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # The root-side end shapes traffic into the namespace; the namespace's end shapes
    # traffic out of it, so both directions of every inter-node link are limited.
    if [[ $rate != none ]]; then
        tc qdisc add dev "${tag}v$n" root tbf rate "$rate" burst 64kb latency 50ms
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 64kb latency 50ms
    fi
    echo "$ns slots=$per_node" >> "$work/hosts"
done

# mpirun's rsh agent: skip leading options, take the host (= namespace) name, run the
# rest inside that namespace.
cat > "$work/agent" <<'AGENT'
#!/bin/sh
while [ $# -gt 0 ]; do
    case "$1" in -*) shift ;; *) break ;; esac
done
host=$1
shift
exec ip netns exec "$host" sh -c "$*"
AGENT
chmod +x "$work/agent"

# Per-rank CPU quotas: every rank joins its own cgroup (emulated-devices.sh's wrapper).
cmd=("$@")
if [[ -n $cpu ]]; then
    mkdir -p "$cgroups"
    mount -t cgroup -o cpu cgroup "$cgroups" || { echo "$0: --cpu needs cgroup v1's cpu controller" >&2; exit 1; }
    mkdir -p "$groups"
    quota=$(awk -v c="$cpu" -v p="$period" 'BEGIN { printf "%d", c * p }')
    for ((r = 0; r < nodes * per_node; r++)); do
        mkdir "$groups/rank$r"
        echo "$period" > "$groups/rank$r/cpu.cfs_period_us"
        echo "$quota" > "$groups/rank$r/cpu.cfs_quota_us"
    done
    cmd=("$(cd "$(dirname "$0")" && pwd)/emulated-devices.sh" --rank "$groups" -- "$@")
fi

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# --bind-to none: every namespace's daemon believes it has the machine to itself and
# would pin its first rank to core 0, so ranks of different "nodes" would share one core.
mpirun --hostfile "$work/hosts" -np $((nodes * per_node)) --map-by "$map" --oversubscribe \
    --bind-to none --mca plm_rsh_agent "$work/agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include 198.18.0.0/24 --mca btl tcp,self --mca btl_tcp_if_include 198.18.0.0/24 \
    -x PATH -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
    --wdir "$PWD" "${cmd[@]}"
