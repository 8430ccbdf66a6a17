#!/usr/bin/env bash
# Re-measure every number in the README's Results section on the embedded model (about 4 hours on 2 cores,
# most of it the paper table; run it on an otherwise idle machine: wall-clock ratios are measured side by side).
# The main job (.venv/bin/cqpolicy run) comes first: steps 3, 5b and 6 use its artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/results
PY=.venv/bin/python
SCHED=../shared/peer-data/smoothcache-schedules/diffuser_schedule.json
[ -f "$SCHED" ] || SCHED=""

# 1. the uncached model: FID over 3 seeds x 1000 samples, accuracy, MACs and time per image, 50 DDIM steps
$PY scripts/bench_foundation.py --steps 50 --num-samples 1000 --seeds 0 1 2 \
    --json docs/results/foundation.json | tee docs/results/foundation.md

# 2. a sample grid (50 steps, 10 per class)
rm -rf out/readme-grid
.venv/bin/cqpolicy sample --steps 50 --num-samples 100 --batch-size 100 --out out/readme-grid
cp out/readme-grid/grid.png docs/fmnist-dit-grid.png

# 3. the paper-scale table: every family's frontier and the main job's learned policies, N = 1000 x 3 test
#    replicates (resumable; a couple of hours), into docs/results/paper/
$PY scripts/bench_paper.py --config configs/fmnist-dit-paper.yaml --out docs/results/paper

# 3b. the baseline families side by side at N = 128 (the table before the paper one)
POLICIES=(none fora:interval=2 fora:interval=3 fora:interval=2,unit=block smoothcache:threshold=0.1
          dps:groups=25 recat:groups=25 dqar:entropy_threshold=1.0 teacache:threshold=0.3
          taylorseer:interval=3,order=2 diffusers-fbc:threshold=0.1 diffusers-taylorseer:interval=3)
if [ -n "$SCHED" ]; then POLICIES+=("schedule:path=$SCHED" "smoothcache-wheel:path=$SCHED"); fi
$PY scripts/bench_table.py --steps 50 --batch-size 64 --num-samples 128 --seeds 0 1 2 --repeats 2 \
    --json docs/results/bench.json --policies "${POLICIES[@]}" | tee docs/results/bench.md

# 4. the cost of recording traces
$PY scripts/bench_trace.py --steps 50 --num-samples 32 --repeats 1 | tee docs/results/trace.md

# 5. uniform refresh (FORA) against phase-locked per-unit-type intervals: 64 samples x 3 seeds
rm -rf out/unit-intervals
$PY scripts/bench_unit_intervals.py --pairs 6:3 6:4 8:4 4:6 --foras 3 4 5 6 --staggered 5 \
    --out out/unit-intervals | tee docs/results/unit-intervals.md

# 5b. the learned phase-locked interval schedules against the hand one (needs the main job's artifacts)
if [ -f out/run/train/intervals-0.2/policy.json ]; then
    rm -rf out/iv-bench
    for b in 0.2 0.25 0.3; do
        .venv/bin/cqpolicy train --traces out/run/traces/none --kind intervals --compute-budget $b \
            --out out/iv-bench-artifacts/b$b --overwrite > /dev/null
    done
    $PY scripts/bench_unit_intervals.py --pairs 8:4 --foras 4 5 --staggered \
        --policies learned:path=out/iv-bench-artifacts/b0.2 learned:path=out/iv-bench-artifacts/b0.25 \
        learned:path=out/iv-bench-artifacts/b0.3 --out out/iv-bench | tee docs/results/intervals-learned.md
fi

# 6. the learned policy's decision overhead (needs the main job's artifact: .venv/bin/cqpolicy run)
if [ -f out/run/retrain/mlp/policy.json ]; then
    $PY scripts/bench_decision.py --policy-path out/run/retrain/mlp --repeats 5 | tee docs/results/decision.md
fi
