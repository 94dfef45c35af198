#!/usr/bin/env bash
# The pipeline bubble, measured: PP 4 with 8 micro-batches on four emulated devices
# (scripts/emulated-devices.sh: one CPU quota per rank) for each schedule, against the
# schedule's formula — idle fraction (p − 1)/(m + p − 1) for GPipe and 1F1B, the bubble
# divided by V for interleaved 1F1B (V = 2: (p − 1)/V / (m + (p − 1)/V)).
# A stage's idle fraction is the part of the pipeline's makespan it did not compute
# (metrics: stage_idle_s / (stage_busy_s + stage_idle_s)), median over steps 5–STEPS.
# Needs root, cgroup v1's cpu controller, OpenMPI and an MPI build:
#   cargo build --release --features mpi
#
#   scripts/pipeline-bubble.sh            # STEPS=14 CPU=0.5 PERIOD_US=10000 MB=8 MODEL=… BIN=… to vary
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/ultramoe}
steps=${STEPS:-14}
cpu=${CPU:-0.5}
period=${PERIOD_US:-10000}
model=${MODEL:-models/pipeline-bench/config.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%-14s %8s %8s %8s %8s %9s %9s\n' schedule stage0 stage1 stage2 stage3 formula "step s"
for sched in gpipe 1f1b interleaved overlap; do
    extra=(--schedule "$sched")
    formula="3/11"
    case $sched in
        interleaved) extra=(--schedule 1f1b --vpp 2); formula="1.5/9.5" ;;
    esac
    run="$work/$sched"
    scripts/emulated-devices.sh -np 4 --cpu "$cpu" --period-us "$period" -- "$bin" --threads 1 train \
        --model-config "$model" --pp 4 --grad-accum 8 --micro-batch "${MB:-8}" --seq-len 128 --data random \
        --steps "$steps" --run-dir "$run" --no-progress --peak-gflops 100 "${extra[@]}" > "$work/log" 2>&1 ||
        { cat "$work/log" >&2; exit 1; }
    python3 - "$run/metrics.jsonl" "$sched" "$formula" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][4:]
idle = [statistics.median(r["stage_idle_s"][s] / (r["stage_idle_s"][s] + r["stage_busy_s"][s]) for r in rows) for s in range(4)]
a, b = sys.argv[3].split("/")
formula = float(a) / float(b)
step = statistics.median(r["step_s"] for r in rows)
print(f"{sys.argv[2]:<14} " + " ".join(f"{100 * x:7.1f}%" for x in idle) + f" {100 * formula:8.1f}% {step:9.3f}")
print(f"{'':<14} " + " ".join(f"{100 * (x / formula - 1):+7.0f}%" for x in idle) + "   (vs formula)")
PY
done
