#!/usr/bin/env python
"""Decision overhead of a learned MLP policy, measured side by side in one process.

    python benchmarks/research/bench_decision.py --policy-path runs/main/retrain/mlp --steps 50 --batch-size 64

Two measures, both against the same sampling run:

1. **in-process**: the time spent inside the policy's ``decide`` (features, normalisation, MLP, state
   update) divided by the total sampling time, with the policy at its deployed threshold;
2. **wall A/B**, median of ``--repeats`` interleaved rounds after a warm-up: the learned policy with a
   threshold so low that every unit computes (it still runs its features and MLP for every unit and step,
   but skips nothing) against ``fora:interval=1`` (the same runtime computing and caching every unit, no
   decision work): the difference is the cost of deciding. Against plain sampling, ``fora:interval=1``
   shows what the caching runtime itself costs (hooks, storing every output), which every cache policy pays.

The decision cost must stay under 1% of step time (issue 5). A step-level artifact (``cqpolicy train
--features step``, the default) runs its MLP once per step; a per-unit one (``--features unit``) once per unit.
"""
from __future__ import annotations

import argparse
import statistics
import time

from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import DelegatingPolicy
from cqpolicy.policies.features import computed_rows
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample


class TimedDecisions(DelegatingPolicy):
    """Adds up the wall time of the inner policy's decisions and counts the rows it lets compute."""

    def __init__(self, inner):
        super().__init__(inner)
        self.seconds, self.calls, self.rows, self.computed = 0.0, 0, 0, 0

    def decide(self, query):
        start = time.perf_counter()
        decision = super().decide(query)
        self.seconds += time.perf_counter() - start
        computed = computed_rows(decision, query.has_cache, query.inputs.shape[0])
        self.calls += 1
        self.rows += len(computed)
        self.computed += int(computed.sum())
        return decision


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--policy-path", required=True, help="a policy artifact of kind mlp (cqpolicy train)")
    p.add_argument("--threshold", type=float, default=None, help="deployed threshold (default: the artifact's)")
    p.add_argument("--per-sample", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    model = load_model(args.model)
    settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                              batch_size=args.batch_size)
    labels = [i % model.num_classes for i in range(args.batch_size)]
    seeds = list(range(args.batch_size))
    base_spec = f"learned:path={args.policy_path}" + (",per_sample=true" if args.per_sample else "")
    deployed = base_spec + (f",threshold={args.threshold}" if args.threshold is not None else "")
    always = base_spec + ",threshold=1e-30"  # predicted harm is never below this: every unit computes

    def run(spec):
        if spec is None:
            start = time.perf_counter()
            sample(model, labels, seeds, settings, progress=False)
            return time.perf_counter() - start, None
        policy = TimedDecisions(make_policy(spec))
        policy.prepare(model, settings)
        with enable(model.transformer, policy):
            start = time.perf_counter()
            sample(model, labels, seeds, settings, progress=False)
            return time.perf_counter() - start, policy

    methods = {"plain": None, "caching runtime, no decisions (fora:interval=1)": "fora:interval=1",
               "learned, every unit computes": always, "learned, deployed": deployed}
    times = {name: [] for name in methods}
    timed = {}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for name, spec in methods.items():
            seconds, policy = run(spec)
            if r:
                times[name].append(seconds)
                if policy is not None:
                    timed.setdefault(name, []).append(policy)
    plain = statistics.median(times["plain"])
    print(f"{args.model}, {args.steps} DDIM steps, batch {args.batch_size} (CFG rows {2 * args.batch_size}), "
          f"median of {args.repeats} interleaved rounds after a warm-up; policy {args.policy_path}"
          f"{' per sample' if args.per_sample else ' per batch'}")
    print()
    print("| run | seconds | ms / step | decide() ms / step | decide share of run | units computed |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        t = statistics.median(times[name])
        if name in timed:
            decide = statistics.median(pol.seconds for pol in timed[name])
            last = timed[name][-1]
            share = f"{100 * decide / t:.2f}%"
            per_step = f"{1000 * decide / args.steps:.2f}"
            computed = f"{100 * last.computed / max(1, last.rows):.1f}%"
        else:
            share, per_step, computed = "–", "–", "100%"
        print(f"| {name} | {t:.2f} | {1000 * t / args.steps:.1f} | {per_step} | {share} | {computed} |")
    always_t = statistics.median(times["learned, every unit computes"])
    runtime_t = statistics.median(times["caching runtime, no decisions (fora:interval=1)"])
    spread = lambda name: f"{min(times[name]):.2f}-{max(times[name]):.2f} s"  # noqa: E731
    print()
    decide_s = statistics.median(pol.seconds for pol in timed["learned, every unit computes"])
    print(f"decision cost, in process: {100 * decide_s / always_t:.2f}% of sampling time (target: at most 1%)")
    print(f"decision cost, wall A/B: learned deciding every unit but skipping none vs the same runtime without "
          f"decisions: {100 * (always_t / runtime_t - 1):+.2f}% (rounds: {spread('learned, every unit computes')} vs "
          f"{spread('caching runtime, no decisions (fora:interval=1)')})")
    print(f"caching runtime vs plain sampling: {100 * (runtime_t / plain - 1):+.2f}% (plain rounds: {spread('plain')})")


if __name__ == "__main__":
    main()
