#!/usr/bin/env python
"""The README's runtime table: every policy family vs the plain model, FID mean ± std over seeds.

    python scripts/bench_table.py --steps 50 --batch-size 64 --num-samples 256 --seeds 0 1 2 \\
        --json bench-table.json --policies none fora:interval=2 ...

Runs ``cqpolicy.evaluation.bench.bench`` once per seed (seed s uses sample seeds s*1_000_000 + i). MACs
and wall time are measured on the first seed only (first batch, all methods interleaved, median of --repeats after a
warm-up); MACs are counted under the FLOP counter; FID uses the shipped classifier against the 10k real
test images; PSNR / SSIM are paired with the plain model on the same seeds.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.bench import bench
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--policies", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dtype", default="fp16")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model = load_model(args.model)
    settings = SampleSettings(steps=args.steps, guidance_scale=model.default_guidance_scale,
                              batch_size=args.batch_size)
    per_seed = []
    for i, s in enumerate(args.seeds):
        rows = bench(model, args.policies, settings, args.num_samples, seed=seed_roles.test_start(s),
                     cache_format=args.cache_dtype, fid=True, repeats=args.repeats if i == 0 else 0)
        per_seed.append(rows)
        print(f"seed {s} done: " + ", ".join(f"{r['policy']} FID {r['fid']:.2f}" for r in rows), flush=True)
    first = per_seed[0]
    print()
    print(f"{args.model}, {args.steps} DDIM steps, guidance {settings.guidance_scale}, batch {args.batch_size}, "
          f"N = {args.num_samples} per seed, seeds {args.seeds}, cache {args.cache_dtype}; wall: median of "
          f"{args.repeats} interleaved repeats (seed {args.seeds[0]}, first batch of {args.batch_size}); MACs "
          f"exact for every scored run")
    print()
    print("| policy | MACs speedup | wall speedup | FID (mean ± std) | ΔFID | PSNR (dB) | SSIM | reuse | "
          "cache MiB | class acc. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_fid = np.array([rows[0]["fid"] for rows in per_seed])
    summary = []
    for j, row in enumerate(first):
        fid = np.array([rows[j]["fid"] for rows in per_seed])
        psnr = np.array([rows[j]["psnr_vs_baseline"] for rows in per_seed])
        ssim = np.array([rows[j]["ssim_vs_baseline"] for rows in per_seed])
        acc = np.array([rows[j]["class_accuracy"] for rows in per_seed])
        delta = fid - base_fid
        psnr_text = "∞ (bit-identical)" if np.isinf(psnr).all() else f"{psnr.mean():.1f}"
        cache = "–" if row["cache_bytes"] is None else f"{row['cache_bytes'] / 2**20:.2f}"
        reuse = "–" if row["reuse_ratio"] is None else f"{row['reuse_ratio']:.2f}"
        print(f"| `{row['policy']}` | {row['macs_speedup']:.2f}× | {row['wall_speedup']:.2f}× | "
              f"{fid.mean():.2f} ± {fid.std():.2f} | {delta.mean():+.2f} ± {delta.std():.2f} | {psnr_text} | "
              f"{ssim.mean():.3f} | {reuse} | {cache} | {acc.mean():.3f} |")
        summary.append({"policy": row["policy"], "policy_config": row["policy_config"],
                        "macs_speedup": row["macs_speedup"], "wall_speedup": row["wall_speedup"],
                        "fid": fid.tolist(), "delta_fid": delta.tolist(), "psnr": psnr.tolist(),
                        "ssim": ssim.tolist(), "class_accuracy": acc.tolist(), "reuse_ratio": row["reuse_ratio"],
                        "cache_bytes": row["cache_bytes"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "per_seed": per_seed}, f, indent=2)


if __name__ == "__main__":
    main()
