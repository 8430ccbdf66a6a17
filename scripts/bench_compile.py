#!/usr/bin/env python
"""torch.compile against eager under the same policies: wall time, compile time, and how far the images move.

    python scripts/bench_compile.py --model fmnist-dit --policies none fora:interval=3 --num-samples 64
    python scripts/bench_compile.py --model fmnist-unet --policies none deepcache:interval=3,branch=0

The runtime's ``compile=True`` compiles each cache unit's computation (regional compilation) while the
policy's decisions stay in Python. Per policy: one untimed compiled run (compilation, timed on its own),
then ``--repeats`` rounds that run eager and compiled in turn on the same batch (same-run ratio of the
medians), and the largest absolute difference and PSNR of the compiled images against the eager ones.
Samples use seeds 40,000,000+ (model-selection role): nothing here is a test sample.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import cqpolicy
from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.cost import wall_timer
from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.sampling import SampleSettings, sample


def timed(model, spec, labels, seeds, settings, compile: bool):
    policy = make_policy(spec)
    policy.prepare(model, settings)
    with cqpolicy.enable(model.transformer, policy, "fp16", compile=compile):
        with wall_timer(model.device) as wall:
            images = sample(model, labels, seeds, settings, progress=False)
    return images, wall["seconds"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """On images in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--policies", nargs="+", default=["none", "fora:interval=3"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=64, help="one batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    model = load_model(args.model)
    settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                              batch_size=args.num_samples)
    first = seed_roles.start("selection")
    seeds = [first + i for i in range(args.num_samples)]
    labels = [s % model.num_classes for s in seeds]
    rows = []
    for spec in args.policies:
        timed(model, spec, labels, seeds, settings, compile=False)  # warm-up
        started = time.perf_counter()
        compiled_images, _ = timed(model, spec, labels, seeds, settings, compile=True)
        compile_s = time.perf_counter() - started
        eager_s, compiled_s = [], []
        for _ in range(args.repeats):
            eager_images, seconds = timed(model, spec, labels, seeds, settings, compile=False)
            eager_s.append(seconds)
            compiled_images, seconds = timed(model, spec, labels, seeds, settings, compile=True)
            compiled_s.append(seconds)
        row = {"model": args.model, "policy": spec, "steps": args.steps, "num_samples": args.num_samples,
               "eager_s": eager_s, "compiled_s": compiled_s, "first_compiled_run_s": compile_s,
               "speedup": statistics.median(eager_s) / statistics.median(compiled_s),
               "max_abs_diff": float((compiled_images - eager_images).abs().max()),
               "psnr_db": psnr(compiled_images, eager_images)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{args.model}, {args.steps} steps, one batch of {args.num_samples}, fp16 cache, "
          f"median of {args.repeats} interleaved runs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| policy | eager s | compiled s | compiled speedup | first compiled run s | max abs diff | PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['policy']}` | {statistics.median(r['eager_s']):.2f} | {statistics.median(r['compiled_s']):.2f} "
              f"| {r['speedup']:.2f}x | {r['first_compiled_run_s']:.0f} | {r['max_abs_diff']:.2e} "
              f"| {r['psnr_db']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
