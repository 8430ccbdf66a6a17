#!/usr/bin/env python
"""Pick a model's default guidance scale by FID on model-selection samples (never on test samples).

    python scripts/select_guidance.py --model fmnist-dit --scales 1.5 2 2.5 3 --num-samples 500
    torchrun --standalone --nproc_per_node 2 scripts/select_guidance.py ...   # the samples shared by 2 processes

Every scale samples the same selection seeds (40,000,000 + i, class i mod 10 or prompt i mod prompts, with the
model's own scheduler; ``cqpolicy/seeds.py``), so the scales are compared on the same noise. Prints a markdown table
of FID, KID and class accuracy per scale and the scale with the lowest FID; ``--json`` keeps the rows.
"""
from __future__ import annotations

import argparse
import json

from cqpolicy import seeds
from cqpolicy.distributed import world
from cqpolicy.evaluation.evaluate import evaluate
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings
from cqpolicy.sampling.sampler import scheduler_for


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit", help="an embedded model's name or a diffusers directory")
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if any(g < 0 for g in args.scales) or args.num_samples < 2:
        p.error("guidance scales must be non-negative and --num-samples at least 2")

    model = load_model(args.model)
    main = world().main  # under torchrun, rank 0 reports
    start = seeds.start("selection")
    rows = []
    for g in args.scales:
        settings = SampleSettings(steps=args.steps, guidance_scale=g, batch_size=args.batch_size,
                                  scheduler=scheduler_for(model, None))
        m = evaluate(model, settings, args.num_samples, seed=start, fid=True).metrics
        rows.append({"guidance_scale": g, "fid": m["fid"], "kid": m.get("kid"), "class_accuracy": m["class_accuracy"]})
        if main:
            print(f"guidance {g:g}: FID {m['fid']:.2f}, KID {m.get('kid', float('nan')):.3f}, "
                  f"accuracy {m['class_accuracy']:.3f}", flush=True)
    best = min(rows, key=lambda r: r["fid"])
    if not main:
        return 0
    print(f"\n{args.model}, {args.steps} {settings.scheduler} steps, N = {args.num_samples} selection samples "
          f"(seeds {start}+)\n")
    print("| guidance | FID | KID | class accuracy |\n|---|---|---|---|")
    for r in rows:
        mark = " **(lowest FID)**" if r is best else ""
        print(f"| {r['guidance_scale']:g}{mark} | {r['fid']:.2f} | {r['kid']:.3f} | {r['class_accuracy']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "best": best}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
