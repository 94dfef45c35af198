#!/usr/bin/env bash
# Runs an MPI job whose ranks behave like separate devices of equal speed: each rank is
# placed in its own cgroup (v1 cpu controller) with a CFS quota of a fraction of a core,
# so a rank that waits cannot lend its share to a busy one, as on real hardware. On a
# 2-core machine, 4 ranks of 0.5 core each model 4 devices: a straggler's extra work
# shows up in the step time instead of being absorbed by idle cores.
# Needs root, cgroup v1's cpu controller at /sys/fs/cgroup/cpu and OpenMPI. The cgroups
# are removed on exit.
#
#   scripts/emulated-devices.sh [-np N] [--cpu 0.5] [--period-us 100000] -- COMMAND...
#
# The quota is enforced per CFS period: a rank may run its whole share at the start of
# a period and then stall for the rest of it. Pipelines, whose ranks hand work to each
# other many times a step, want a short period (e.g. --period-us 5000) so that a stall
# is short against a pass.
set -euo pipefail
root=/sys/fs/cgroup/cpu
if [[ "${1:-}" == "--rank" ]]; then
    # Per-rank wrapper (started by mpirun): join this rank's cgroup, then run COMMAND.
    dir=$2; shift 3
    group="$dir/rank${OMPI_COMM_WORLD_RANK:?not started by mpirun}"
    echo $$ > "$group/cgroup.procs"
    exec "$@"
fi
np=4
cpu=0.5
period=100000
while [[ $# -gt 0 ]]; do
    case "$1" in
        -np) np=$2; shift 2 ;;
        --cpu) cpu=$2; shift 2 ;;
        --period-us) period=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [-np N] [--cpu FRACTION] [--period-us US] -- COMMAND..." >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "$0: needs root (cgroups)" >&2; exit 1; }
[[ -w $root ]] || { echo "$0: no writable cgroup v1 cpu controller at $root" >&2; exit 1; }
dir="$root/ultramoe-$$"
cleanup() {
    for g in "$dir"/rank*; do
        [[ -d $g ]] || continue
        # Any straggling process goes back to the root group so the directory can go.
        while read -r pid; do echo "$pid" > "$root/cgroup.procs" 2>/dev/null || true; done < "$g/cgroup.procs"
        rmdir "$g" 2>/dev/null || true
    done
    rmdir "$dir" 2>/dev/null || true
}
trap cleanup EXIT
trap "exit 130" INT TERM
mkdir -p "$dir"
quota=$(awk -v c="$cpu" -v p=$period 'BEGIN { printf "%d", c * p }')
for ((r = 0; r < np; r++)); do
    mkdir "$dir/rank$r"
    echo $period > "$dir/rank$r/cpu.cfs_period_us"
    echo "$quota" > "$dir/rank$r/cpu.cfs_quota_us"
done
mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$np" "$0" --rank "$dir" -- "$@"
