#!/usr/bin/env python
"""Cost of recording traces relative to plain sampling, measured side by side in one process.

    python scripts/bench_trace.py --steps 50 --num-samples 32 --repeats 2

Times (median of --repeats, after a warm-up): plain sampling; recording signals only (no probes);
recording with all local probes; the downstream pass. Prints the ratios to plain sampling and the split
between signals and probes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from cqpolicy import seeds as seed_roles
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.tracing.collect import collect


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    model = load_model(args.model)
    settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                              batch_size=args.num_samples)
    labels = [i % model.num_classes for i in range(args.num_samples)]
    seeds = [seed_roles.start("trace") + i for i in range(args.num_samples)]

    def plain():
        sample(model, labels, seeds, settings, progress=False)

    def traced(probes):
        def run():
            with tempfile.TemporaryDirectory() as tmp:
                return collect(model, settings, f"{tmp}/run", args.num_samples, probes=probes, progress=False)
        return run

    methods = {"plain sampling": plain, "signals only": traced(()), "signals + local probes": traced(("local",)),
               "signals + local + downstream": traced(("local", "downstream"))}
    times = {name: [] for name in methods}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain sampling"])
    print(f"{args.model}, {args.steps} DDIM steps, {args.num_samples} samples (CFG batch {2 * args.num_samples}), "
          f"median of {args.repeats} after a warm-up")
    print()
    print("| what | seconds | × plain sampling |")
    print("|---|---|---|")
    for name in methods:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.1f} | {t / base:.1f}× |")
    signals = statistics.median(times["signals only"]) - base
    probes = statistics.median(times["signals + local probes"]) - statistics.median(times["signals only"])
    print()
    print(f"split of the recording overhead: signals {signals:.1f} s ({signals / base:.1f}× plain), "
          f"local probes {probes:.1f} s ({probes / base:.1f}× plain)")


if __name__ == "__main__":
    main()
