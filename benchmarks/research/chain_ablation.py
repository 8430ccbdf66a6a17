#!/usr/bin/env python
"""What chain labels add to the trace-trained MLP (issue 16): two MLPs trained on the same traces, one on the
one-reuse labels only (``impact_local``), one with the chain labels too (``--probes chain`` traces,
``train --chain``), each at thresholds chosen on search seeds to land on given MACs speedups. The chain MLP runs
under two rules: a threshold on each step's predicted cost, and ``cumulative=true`` (a threshold on the chain's
summed predicted cost). With ``--rollout-traces`` (a gates artifact's rollouts recorded as traces,
``cqpolicy train gates --rollout-traces N``) a third MLP trains on the chain traces plus those runs and
runs under the cumulative rule: what the states a through-sampler policy reaches add to the trace data.

    python benchmarks/research/chain_ablation.py --traces out/chain/traces --out out/chain --speedups 2 3 4

The one-reuse MLP needs a cap on consecutive reuses (uncapped it never refreshes: its labels price one reuse of a
fresh cache), so it gets the smallest cap that can reach each speedup; the chain MLP runs uncapped. Thresholds are
bisected on search seeds (``cqpolicy.seeds`` role ``search``), never on test seeds; the specs found are written to
``OUT/specs.json`` (a rerun keeps the ones found and bisects only what is missing) and printed as lines for a
paper-table config (``cqpolicy bench --config`` then scores them on the test replicates).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.cost import measured_sample, model_costs
from cqpolicy.evaluation.evaluate import default_labels
from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.sampling.sampler import settings_for
from cqpolicy.training.train import train_policy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True, help="a trace run recorded with --probes local,chain[,downstream]")
    p.add_argument("--out", required=True)
    p.add_argument("--rollout-traces", nargs="+", default=[],
                   help="trace runs recorded under a deployed policy (gates rollouts): adds the mlp-chain-rollouts arm")
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--search-samples", type=int, default=16)
    p.add_argument("--max-epochs", type=int, default=15)
    p.add_argument("--iterations", type=int, default=14, help="bisection steps on log10(threshold)")
    return p.parse_args(argv)


def speedup_of(model, spec, settings, seeds, labels, plain_macs) -> float:
    policy = make_policy(spec)
    policy.prepare(model, settings)
    run = measured_sample(model, policy, "fp16", labels, seeds, settings)
    return plain_macs / run.macs


def bisect(model, spec_at, target, settings, seeds, labels, plain_macs, iterations, bar) -> tuple[str, float]:
    """The spec whose MACs speedup on ``seeds`` is closest to ``target`` (threshold up: more reuse)."""
    lo, hi = -8.0, 2.0
    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        spec = spec_at(10 ** mid)
        got = speedup_of(model, spec, settings, seeds, labels, plain_macs)
        bar.update(1)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (spec, got)
        lo, hi = (mid, hi) if got < target else (lo, mid)
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    artifacts = {}
    trained = [("mlp-one-reuse", False, [args.traces]), ("mlp-chain", True, [args.traces])]
    if args.rollout_traces:
        trained.append(("mlp-chain-rollouts", True, [args.traces, *args.rollout_traces]))
    for name, chain, traces in trained:
        path = out / name
        if not (path / "policy.json").is_file():
            train_policy(traces, out_dir=path, max_epochs=args.max_epochs, seed=0, chain=chain, progress=False)
        artifacts[name] = path
    model = load_model(args.model)
    meta = json.loads((artifacts["mlp-chain"] / "policy.json").read_text())["model"]
    settings = settings_for(model, meta["steps"], meta["scheduler"], batch_size=args.search_samples,
                            guidance_scale=meta["guidance_scale"])
    first = seed_roles.start("search")
    seeds = list(range(first, first + args.search_samples))
    labels = default_labels(len(seeds), model.num_classes)
    plain_macs = model_costs(model, settings).plain(len(seeds), settings)
    specs = out / "specs.json"
    found = json.loads(specs.read_text()) if specs.is_file() else {}
    arms = ("mlp-one-reuse", "mlp-chain", "mlp-chain-cumulative") + (
        ("mlp-chain-rollouts-cumulative",) if args.rollout_traces else ())
    todo = [(t, a) for t in args.speedups for a in arms if f"{a}@{t:g}x" not in found]
    bar = tqdm(total=len(todo) * args.iterations, desc="threshold bisection", unit="run")
    for target, name in todo:
        cap = max(1, math.ceil(target))  # FORA-(cap + 1) is the fastest a cap of `cap` reuses allows
        path = artifacts[name.removesuffix("-cumulative")]
        rule = ",cumulative=true" if name.endswith("-cumulative") else f",max_reuse={cap}" if name == "mlp-one-reuse" \
            else ""
        spec_at = lambda t: f"learned:path={path},threshold={t:.6g}{rule}"  # noqa: E731
        spec, got = bisect(model, spec_at, target, settings, seeds, labels, plain_macs, args.iterations, bar)
        found[f"{name}@{target:g}x"] = {"spec": spec, "search_speedup": got}
        specs.write_text(json.dumps(found, indent=2) + "\n")
        bar.write(f"{name} at {target:g}x: {spec} ({got:.2f}x on {len(seeds)} search samples)")
    bar.close()
    print("\n".join(f"  - {v['spec']}" for v in found.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        print(f"chain_ablation: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
