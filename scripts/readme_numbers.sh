#!/usr/bin/env bash
# Re-measure every number in the README's Results section on the embedded model (about 9 hours on 2 cores,
# most of it the paper table, which resumes where it stopped; run it on an otherwise idle machine: wall-clock
# ratios are measured side by side). The main job (.venv/bin/cqpolicy run) comes first: the paper table benches
# its learned policies.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/results
PY=.venv/bin/python

# 0. the default guidance scale, chosen on model-selection samples (seeds 40,000,000+), never on test samples
$PY scripts/select_guidance.py --scales 1.5 2 2.5 3 --num-samples 500 --json docs/results/guidance.json \
    | tee docs/results/guidance.md

# 1. the uncached model: FID over 3 seeds x 1000 samples, accuracy, MACs and time per image, 50 DDIM steps
$PY scripts/bench_foundation.py --steps 50 --num-samples 1000 --seeds 0 1 2 \
    --json docs/results/foundation.json | tee docs/results/foundation.md

# 2. a sample grid (50 steps, 10 per class)
rm -rf out/readme-grid
.venv/bin/cqpolicy sample --steps 50 --num-samples 100 --batch-size 100 --out out/readme-grid
cp out/readme-grid/grid.png docs/fmnist-dit-grid.png

# 3. the paper-scale table: every family's frontier and the main job's learned policies, N = 1000 x 3 test
#    replicates (resumable; about 7 hours here), into docs/results/paper/
$PY scripts/bench_paper.py --config configs/fmnist-dit-paper.yaml --out docs/results/paper

# 4. the cost of recording traces
$PY scripts/bench_trace.py --steps 50 --num-samples 32 --repeats 1 | tee docs/results/trace.md
