#!/usr/bin/env bash
# Expert-parallel all-to-all hidden by the overlapped schedule, measured: PP 2 × EP 2 on
# two emulated nodes (scripts/emulated-nodes.sh: rate-limited link, ranks round-robin so
# each expert-parallel pair spans the nodes, one CPU quota per rank), plain 1F1B against
# the overlapped schedule, same model, data and micro-batches. Per schedule, medians over
# steps 3–STEPS: the step's seconds, the all-to-all's seconds (a2a_s, summed over the
# exchanges of the rank's passes), its exposed part (a2a_exposed_s: the time a compute
# lane waited on an exchange), the hidden fraction 1 − exposed / all-to-all, and each
# stage's busy seconds (the step less its waits for the other stage).
# Needs root, iproute2, cgroup v1's cpu controller, OpenMPI and an MPI build:
#   cargo build --release --features mpi
#
#   scripts/pipeline-overlap.sh       # M=8 MB=16 STEPS=10 RATE=1gbit CPU=0.5 PERIOD_US=5000 CHUNKS=2 BIN=… MODEL=config.json
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/ultramoe}
steps=${STEPS:-10}
model=${MODEL:-models/pipeline-bench/config.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%-9s %9s %9s %11s %9s %15s\n' schedule "step s" "a2a s" "exposed s" hidden "stage busy s"
for sched in 1f1b overlap; do
    run="$work/$sched"
    # Now and then OpenMPI's mpirun hangs: before any rank starts (a node's daemon never
    # came up), or after every rank has finished (a daemon left waiting). A launch that
    # has not created the run directory in 60 s is ended and tried again (three times at
    # most); a run that has saved its model, with no rank left, is ended after 20 s.
    for attempt in 1 2 3; do
        rm -rf "$run"
        setsid scripts/emulated-nodes.sh --nodes 2 --ranks-per-node 2 --round-robin --rate "${RATE:-1gbit}" \
            --cpu "${CPU:-0.5}" --period-us "${PERIOD_US:-5000}" -- "$bin" --threads 1 train --mpi-wait sleep \
            --model-config "$model" --pp 2 --ep 2 --grad-accum "${M:-8}" --micro-batch "${MB:-16}" --seq-len 128 \
            --data random --steps "$steps" --run-dir "$run" --no-progress --peak-gflops 100 \
            --schedule "$sched" --overlap-chunks "${CHUNKS:-2}" > "$work/log" 2>&1 &
        job=$!
        started=$SECONDS finished= stuck=
        while kill -0 "$job" 2>/dev/null; do
            if [[ ! -d $run ]] && ((SECONDS - started > 60)); then
                stuck=1
            elif [[ -f $run/model/config.json ]] && ! pgrep -f -- "^$bin .*--run-dir $run " > /dev/null; then
                finished=${finished:-$SECONDS}
                ((SECONDS - finished > 20)) && stuck=1
            fi
            if [[ -n $stuck ]]; then
                kill -- -"$job" 2>/dev/null || true
                wait "$job" 2>/dev/null || true
                break
            fi
            sleep 1
        done
        if [[ -n $finished ]]; then
            [[ -z $stuck ]] || echo "($sched: the run finished but mpirun did not exit; ended it)" >&2
            break
        fi
        if [[ -n $stuck ]]; then
            echo "($sched: mpirun started no rank in 60 s; attempt $attempt of 3 ended)" >&2
            continue
        fi
        wait "$job" || { cat "$work/log" >&2; exit 1; }
        break
    done
    [[ -f $run/model/config.json ]] || { echo "$sched: no run finished" >&2; exit 1; }
    python3 - "$run/metrics.jsonl" "$sched" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
med = lambda k: statistics.median(r[k] for r in rows)
hidden = statistics.median(1 - r["a2a_exposed_s"] / r["a2a_s"] for r in rows)
busy = " ".join(f"{statistics.median(r['stage_busy_s'][s] for r in rows):.3f}" for s in range(2))
print(f"{sys.argv[2]:<9} {med('step_s'):9.3f} {med('a2a_s'):9.3f} {med('a2a_exposed_s'):11.3f} {100 * hidden:8.1f}% {busy:>15}")
PY
done
