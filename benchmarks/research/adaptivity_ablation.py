#!/usr/bin/env python
"""What input-adaptivity adds (issue 16, item 3): a learned policy that decides from run-time features against
its own static (mean) schedule at equal MACs.

    python benchmarks/research/adaptivity_ablation.py --policy "learned:path=DIR,threshold=T,max_reuse=3" --out out/adaptivity

The policy runs on search seeds (``cqpolicy.seeds`` role ``search``, never test seeds) while a wrapper counts, per
(step, block, unit), the share of rows it computed. The static schedule computes the cells the policy computed
most often, most often first, until its unit MACs reach the policy's mean unit MACs: the same budget, spent where
the policy spent it on average, with no per-input choice left. It is written as ``OUT/mean-schedule.safetensors``
(deploy with ``table:path=...``); both specs are printed as lines for a paper-table config
(``cqpolicy bench --config`` then scores them on the test replicates).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.cost import measured_sample, model_costs
from cqpolicy.evaluation.evaluate import default_labels
from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import DelegatingPolicy
from cqpolicy.policies.families.table import save_table
from cqpolicy.sampling.sampler import settings_for


class ComputeCounter(DelegatingPolicy):
    """Passes every decision through and sums, per (step, block, unit), the share of rows that computed."""

    def __init__(self, inner):
        super().__init__(inner)
        self.computed: dict[tuple[int, int, str], float] = {}
        self.calls: dict[tuple[int, int, str], int] = {}

    def decide(self, query):
        decision = super().decide(query)
        if not query.has_cache:
            share = 1.0
        elif torch.is_tensor(decision):
            share = float(decision.float().mean())
        else:
            share = float(bool(decision))
        key = (query.step, query.block, query.unit)
        self.computed[key] = self.computed.get(key, 0.0) + share
        self.calls[key] = self.calls.get(key, 0) + 1
        return decision


def mean_schedule(counter: ComputeCounter, units: tuple[str, ...], unit_macs: dict, steps: int,
                  blocks: int) -> torch.Tensor:
    """The static table [steps, blocks, units] of the most-computed cells whose unit MACs reach the policy's mean."""
    share = torch.zeros(steps, blocks, len(units), dtype=torch.float64)
    for (s, b, u), total in counter.computed.items():
        share[s, b, units.index(u)] = total / counter.calls[(s, b, u)]
    macs = torch.tensor([[unit_macs[(b, u)] for u in units] for b in range(blocks)], dtype=torch.float64)
    macs = macs.expand(steps, blocks, len(units))
    target = float((share * macs).sum())
    order = torch.argsort(share.reshape(-1), descending=True, stable=True)  # ties: earlier steps first
    spent = torch.cumsum(macs.reshape(-1)[order], 0)
    keep = int((spent < target - 1e-9).sum()) + 1  # the fewest cells that reach the target
    table = torch.zeros(steps * blocks * len(units), dtype=torch.bool)
    table[order[:keep]] = True
    return table.reshape(steps, blocks, len(units))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="the adaptive policy spec (e.g. learned:path=DIR,threshold=T)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=128, help="search samples the mean schedule is taken over")
    p.add_argument("--batch-size", type=int, default=64, help="as the paper bench runs (per-batch decisions)")
    args = p.parse_args(argv)
    out = Path(args.out)
    target = out / "mean-schedule.safetensors"
    if target.exists():
        raise ValueError(f"{target} exists; choose another --out")
    model = load_model(args.model)
    settings = settings_for(model, args.steps, "ddim", args.batch_size, None)
    first = seed_roles.start("search")
    seeds = list(range(first, first + args.samples))
    labels = default_labels(len(seeds), model.num_classes)
    costs = model_costs(model, settings)
    plain = costs.plain(len(seeds), settings)

    policy = make_policy(args.policy)
    policy.prepare(model, settings)
    counter = ComputeCounter(policy)
    adaptive = measured_sample(model, counter, "fp16", labels, seeds, settings, progress=True)
    units = tuple(dict.fromkeys(u for _, _, u in counter.calls))
    blocks = 1 + max(b for _, b, _ in counter.calls)
    table = mean_schedule(counter, units, costs.unit_macs, args.steps, blocks)
    out.mkdir(parents=True, exist_ok=True)
    save_table(table, units, target)
    static_spec = f"table:path={target}"
    static_policy = make_policy(static_spec)
    static_policy.prepare(model, settings)
    static = measured_sample(model, static_policy, "fp16", labels, seeds, settings, progress=True)
    report = {"adaptive": {"spec": args.policy, "search_speedup": plain / adaptive.macs},
              "static": {"spec": static_spec, "search_speedup": plain / static.macs},
              "search_seeds": [first, len(seeds)],
              "cells_varying": int(sum(0 < c / counter.calls[k] < 1 for k, c in counter.computed.items()))}
    (out / "adaptivity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"  - {args.policy}\n  - {static_spec}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        print(f"adaptivity_ablation: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
