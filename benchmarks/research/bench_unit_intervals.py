#!/usr/bin/env python
"""Uniform refresh (FORA) against phase-locked per-unit-type intervals, FID mean ± std over seeds.

    python benchmarks/research/bench_unit_intervals.py --pairs 6:3 6:4 4:6 --foras 3 4 5 --out out/unit-intervals

Each ``A:F`` pair writes a SmoothCache JSON schedule in which every block's ``attn1`` computes at steps
0, A, 2A, ... and its ``ff`` at steps 0, F, 2F, ...: refreshes stay in phase across blocks, as in FORA, but
attention and feed-forward keep their caches for different lengths. ``--staggered K`` adds FORA-K with
block b's refresh shifted by b mod K steps (same share of computed units, phases out of step), the control
for "does synchronised refresh matter". Every schedule runs through ``schedule:path=...`` in the same
runtime as the rest, benched by the one engine (``cqpolicy.evaluation.engine``) on test replicates ``--seeds``
(replicate s draws the noise of samples s * 1,000,000 + i), rows under OUT/bench/.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cqpolicy.evaluation.engine import parse_config, run_bench
from cqpolicy.models import load_model
from cqpolicy.models.adapters import cache_blocks


def schedule(steps: int, blocks: int, interval: dict, phase=lambda block: 0) -> dict:
    """``{unit-block: [0/1 per step]}``: unit computes when (step - phase) % interval == 0, and at step 0."""
    return {f"{unit}-{b}": [int(s == 0 or (s - phase(b)) % k == 0) for s in range(steps)]
            for b in range(blocks) for unit, k in interval.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--pairs", nargs="+", default=["6:3", "6:4", "8:4", "4:6"], help="attn1:ff intervals")
    p.add_argument("--foras", type=int, nargs="*", default=[3, 4, 5], help="uniform FORA intervals to compare")
    p.add_argument("--staggered", type=int, nargs="*", default=[5])
    p.add_argument("--policies", nargs="*", default=[], help="more policy specs to bench alongside (e.g. "
                   "learned:path=DIR of a `cqpolicy train intervals` artifact)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="a new or empty folder: schedules/ and results.json")
    args = p.parse_args()

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty")
    (out / "schedules").mkdir(parents=True)
    model = load_model(args.model)
    blocks = len(cache_blocks(model.transformer))
    specs = [f"fora:interval={k}" for k in args.foras]
    for pair in args.pairs:
        a, f = (int(v) for v in pair.split(":"))
        path = out / "schedules" / f"attn{a}_ff{f}.json"
        path.write_text(json.dumps(schedule(args.steps, blocks, {"attn1": a, "ff": f})))
        specs.append(f"schedule:path={path}")
    for k in args.staggered:
        path = out / "schedules" / f"fora{k}_staggered.json"
        path.write_text(json.dumps(schedule(args.steps, blocks, {"attn1": k, "ff": k}, phase=lambda b, k=k: b % k)))
        specs.append(f"schedule:path={path}")

    specs += args.policies
    config = parse_config({"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                           "num_samples": args.num_samples, "seeds": args.seeds, "methods": specs, "repeats": 0,
                           "experiment": "cqpolicy-bench-unit-intervals"}, "bench_unit_intervals")
    rows = run_bench(config, out / "bench", model=model)
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    base = {r["seed"]: r["fid"] for r in rows if r["policy"] == "baseline"}
    macs = {r["policy"]: r["macs_speedup"] for r in rows if r.get("macs_speedup") is not None}
    print(f"{args.model}, {args.steps} DDIM steps, N = {args.num_samples} per seed, seeds {args.seeds}")
    print()
    print("| method | MACs speedup | FID (mean ± std over seeds) | ΔFID vs plain, same seeds |")
    print("|---|---|---|---|")
    for spec in ["baseline"] + specs:
        fids = [r["fid"] for r in rows if r["policy"] == spec]
        delta = statistics.mean(r["fid"] - base[r["seed"]] for r in rows if r["policy"] == spec)
        name = Path(spec.split("=", 1)[1]).stem if spec.startswith("schedule:") else spec
        name = f"learned {Path(spec.split('=', 1)[1].split(',')[0]).name}" if spec.startswith("learned:") else name
        name = "plain model" if spec == "baseline" else name  # bench's name for the uncached reference run
        print(f"| {name} | {macs.get(spec, 1.0):.2f}× | {statistics.mean(fids):.2f} ± {statistics.stdev(fids):.2f} "
              f"| {delta:+.2f} |")


if __name__ == "__main__":
    main()
