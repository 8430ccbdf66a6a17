#!/usr/bin/env python
"""How much of one reuse's local output error reaches the final sample, step by step.

    python benchmarks/research/bench_downstream.py --traces out/run/traces/none --num-samples 16

For each (unit, block) in --units and each step in --steps-probed, every sample is sampled again with that
one unit forced to reuse its last computed output at that one step; the relative L2 change of the final
sample is compared with the mean local impact label of the same (step, block, unit) in a trace run
recorded under ``none`` with the same model and step count. Prints the ratio downstream / local per step:
the per-step weight that ``cqpolicy train --label downstream`` fits from the traces' own probes.
"""
from __future__ import annotations

import argparse

from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.tracing import TraceReader
from cqpolicy.tracing.collect import _ForcedReuse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True, help="a trace run recorded under `none` with local probes")
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=5_000_000)
    p.add_argument("--units", nargs="+", default=["ff:5", "attn1:5", "ff:10"], help="UNIT:BLOCK")
    p.add_argument("--steps-probed", type=int, nargs="+", default=[1, 2, 3, 5, 8, 12, 20, 30, 40, 45, 49])
    args = p.parse_args()

    model = load_model(args.model)
    settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                              batch_size=args.num_samples)
    labels = [i % model.num_classes for i in range(args.num_samples)]
    seeds = [args.seed + i for i in range(args.num_samples)]
    base = sample(model, labels, seeds, settings, progress=False)
    table = TraceReader([args.traces]).table(["cfg_branch", "step", "block", "unit", "impact_local"]).to_pandas()
    table = table[table["cfg_branch"] == 0]
    print(f"{args.model}, {args.steps} DDIM steps, {args.num_samples} samples (seeds {seeds[0]}..{seeds[-1]}); "
          f"local impact: mean over the conditional rows of {args.traces}")
    print()
    print("| unit | block | step | local impact | final-sample change | ratio |")
    print("|---|---|---|---|---|---|")
    for spec in args.units:
        unit, block = spec.split(":")
        block = int(block)
        for step in args.steps_probed:
            forced = _ForcedReuse(make_policy("none"), [(step, block, unit)] * args.num_samples, True)
            forced.prepare(model, settings)
            with enable(model.transformer, forced, cache_format="fp32"):
                out = sample(model, labels, seeds, settings, progress=False)
            change = float(((out - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)).mean())
            rows = table[(table["step"] == step) & (table["block"] == block) & (table["unit"] == unit)]
            local = float(rows["impact_local"].mean())
            print(f"| {unit} | {block} | {step} | {local:.4f} | {change:.5f} | {change / local:.3f} |", flush=True)


if __name__ == "__main__":
    main()
