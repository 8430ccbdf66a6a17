#!/usr/bin/env python
"""The README's foundation table: the uncached embedded model measured over several seeds.

    python scripts/bench_foundation.py --steps 50 --num-samples 1000 --seeds 0 1 2

Seed s draws sample seeds s*1_000_000 + i (disjoint noise per seed). Prints a markdown table of FID
(classifier features vs the real test set, mean ± std over seeds), class accuracy, MACs and wall time per
image, beside the shipped real-vs-real FID floor; writes the rows to --json.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from cqpolicy.evaluation.classifier import classifier_info
from cqpolicy.evaluation.evaluate import evaluate
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model = load_model(args.model)
    g = model.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    settings = SampleSettings(steps=args.steps, guidance_scale=g, scheduler=args.scheduler,
                              batch_size=args.batch_size)
    rows = []
    for s in args.seeds:
        result = evaluate(model, settings, args.num_samples, seed=s * 1_000_000, fid=True)
        rows.append(result.metrics)
        m = result.metrics
        print(f"seed {s}: FID {m['fid']:.3f}, accuracy {m['class_accuracy']:.4f}, "
              f"{m['time_per_image_s'] * 1e3:.1f} ms/image, {m['macs_per_image'] / 1e9:.3f} GMACs/image")
    fid = np.array([r["fid"] for r in rows])
    acc = np.array([r["class_accuracy"] for r in rows])
    tpi = np.array([r["time_per_image_s"] for r in rows])
    floor = classifier_info()["real_vs_real_fid"]
    n_floor = str(args.num_samples) if str(args.num_samples) in floor else max(floor, key=int)
    print()
    print(f"{args.model}, {args.steps} {args.scheduler.upper()} steps, guidance {g}, batch {args.batch_size}, "
          f"N = {args.num_samples} per seed, seeds {args.seeds}")
    print()
    print("| quantity | value |")
    print("|---|---|")
    print(f"| FID (classifier features, vs 10k real test images) | {fid.mean():.2f} ± {fid.std():.2f} |")
    print(f"| real-vs-real FID floor ({n_floor} real train images vs test, 3 draws) | "
          f"{floor[n_floor]['mean']:.2f} ± {floor[n_floor]['std']:.2f} |")
    print(f"| class accuracy (shipped classifier) | {acc.mean():.4f} ± {acc.std():.4f} |")
    print(f"| MACs per image ({args.steps} steps, CFG batch) | {rows[0]['macs_per_image'] / 1e9:.3f} G |")
    print(f"| wall time per image | {tpi.mean() * 1e3:.1f} ± {tpi.std() * 1e3:.1f} ms |")
    print(f"| peak memory above start (RSS) | {max(r['peak_memory_bytes'] for r in rows) / 2**20:.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
