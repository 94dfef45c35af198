#!/usr/bin/env bash
# One memory budget, two runs: the plain step at the largest micro-batch that fits it,
# and the budget-chosen memory policy at twice that micro-batch (then at the largest
# micro-batch the policy fits). Each line: micro-batch, policy, measured peak, median
# tokens/s over steps 6–25. Runs alternate, RUNS times, so drift hits both alike.
#
#   scripts/memory-budget.sh                 # 150MB, math MoE, seq 128, random data
#   BUDGET=300MB RUNS=3 scripts/memory-budget.sh
#   MODEL=../shared/fixtures/bench/deepseek_v3_small/config.json BUDGET=400MB scripts/memory-budget.sh
set -euo pipefail
BUDGET=${BUDGET:-150MB}
RUNS=${RUNS:-2}
SEQ=${SEQ:-128}
BIN=${BIN:-target/release/ultramoe}
model=()
if [ -n "${MODEL:-}" ]; then model=(--model-config "$MODEL"); fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

fits=$("$BIN" memory "${model[@]}" --seq-len "$SEQ" --memory-budget "$BUDGET" --micro-batch 1 | head -1)
plain=$(sed -E 's/.*keeping everything ([0-9]+).*/\1/' <<<"$fits")
echo "budget $BUDGET: largest micro-batch without a policy $plain"
"$BIN" memory "${model[@]}" --seq-len "$SEQ" --memory-budget "$BUDGET" --micro-batch $((2 * plain)) | head -2

run() { # micro-batch, tag
    rm -rf "$out/$2"
    "$BIN" train "${model[@]}" --seq-len "$SEQ" --data random --steps 25 --micro-batch "$1" --memory-budget "$BUDGET" \
        --run-dir "$out/$2" --no-progress >"$out/$2.log" 2>&1
    python3 - "$out/$2" "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
tps = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 5)
peak = max(r["peak_bytes"] for r in rows)
print(f"micro-batch {sys.argv[2]:>3}  peak {peak / 1e6:7.1f} MB  {tps:8.0f} tokens/s")
PY
    grep -- "--memory-budget:" "$out/$2.log" || true
}

for r in $(seq "$RUNS"); do
    run "$plain" "plain-$r"
    run $((2 * plain)) "double-$r"
done
