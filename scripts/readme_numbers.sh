#!/usr/bin/env bash
# Re-measure every number in the README's Results section on the embedded model (about 4 hours on 2 cores,
# most of it the paper table, which resumes where it stopped; run it on an otherwise idle machine: wall-clock
# ratios are measured side by side). The main job comes first: the paper table benches its learned policies.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/results
PY=.venv/bin/python

# main job: traces, training, study, bench, report (out/run/report/); its README table
rm -rf out/run
.venv/bin/cqpolicy run --out out/run
cp out/run/report/leaderboard/leaderboard.{md,csv} out/run/report/leaderboard/pareto.png out/run/report/grids.png \
    out/run/report/learned-*.png docs/results/main-job/

# 0. the default guidance scale, chosen on model-selection samples (seeds 40,000,000+), never on test samples
$PY scripts/select_guidance.py --scales 1.5 2 2.5 3 --num-samples 500 --json docs/results/guidance.json \
    | tee docs/results/guidance.md

# 1. the uncached model (FID over 3 test replicates x 1000 samples, accuracy, MACs and time per image, 50 DDIM
#    steps) is the plain rows of the paper table, step 3 (docs/results/paper/rows/*/baseline-*.json); alone:
#    cqpolicy bench --config configs/fmnist-dit-paper.yaml --out docs/results/paper --only baseline

# 2. a sample grid (50 steps, 10 per class)
rm -rf out/readme-grid
.venv/bin/cqpolicy sample --steps 50 --num-samples 100 --batch-size 100 --out out/readme-grid
cp out/readme-grid/grid.png docs/fmnist-dit-grid.png

# 3. the paper-scale table: every family's frontier and the main job's learned policies, N = 1000 x 3 test
#    replicates (resumable; about 3 hours here), into docs/results/paper/; its README table
.venv/bin/cqpolicy bench --config configs/fmnist-dit-paper.yaml --out docs/results/paper

# 4. the cost of recording traces
$PY scripts/bench_trace.py --steps 50 --num-samples 32 --repeats 1 | tee docs/results/trace.md

# 5. torch.compile (each unit compiled, decisions in Python) against eager, same run
$PY scripts/bench_compile.py --model fmnist-dit --policies none fora:interval=3 --num-samples 64 --repeats 3 \
    --json docs/results/compile.json | grep -v '^{' | tee docs/results/compile.md

# 6. the embedded UNet: guidance on model-selection samples, a sample grid, its main job (DeepCache and every
#    family on layers), and its paper table (whose plain rows are the uncached model over 3 x 1000 test samples)
U=docs/results/fmnist-unet
mkdir -p $U/main-job
$PY scripts/select_guidance.py --model fmnist-unet --scales 1.5 2 2.5 3 --num-samples 500 --json $U/guidance.json \
    | tee $U/guidance.md
rm -rf out/readme-grid-unet
.venv/bin/cqpolicy sample --model fmnist-unet --steps 50 --num-samples 100 --batch-size 100 --out out/readme-grid-unet
cp out/readme-grid-unet/grid.png docs/fmnist-unet-grid.png
rm -rf out/run-unet
.venv/bin/cqpolicy run configs/fmnist-unet.yaml --out out/run-unet
cp out/run-unet/report/leaderboard/leaderboard.{md,csv} out/run-unet/report/leaderboard/pareto.png \
    out/run-unet/report/grids.png out/run-unet/report/learned-*.png $U/main-job/
.venv/bin/cqpolicy bench --config configs/fmnist-unet-paper.yaml --out docs/results/paper-unet

# every table in README.md and docs/ from the files above
.venv/bin/cqpolicy docs
