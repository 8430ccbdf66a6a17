#!/usr/bin/env python
"""Re-choose a forecast variant under protocol v2: validation replicates choose, unused test replicates score.

The UNet's affine forecast was chosen after the free fit's test rows were seen (paper table, test replicates 0-2).
This re-runs that choice as the protocol says: the three variants fitted on FORA-3's layer schedule (free, on-policy,
affine; frozen under docs/results/paper-unet/policies/) are benched on validation replicates, the one with the
lowest mean ΔFID is chosen (the rule is fixed here, before any row exists), and only the chosen one is scored on
test replicates no table has used (3, 4, 5), beside the plain model, FORA-3 and TaylorSeer at intervals 3 and 4
(so TaylorSeer's frontier reaches the forecast's MACs and it is opposed there, not unopposed).

    python benchmarks/research/rechoose_forecast.py --out docs/results/rechoose-unet      # resumable

Writes OUT/validation/ and OUT/test/ (engine folders: rows, leaderboard) and OUT/choice.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from cqpolicy.evaluation.engine import BenchError, parse_config, run_bench

POLICIES = Path("docs/results/paper-unet/policies")
VARIANTS = [f"forecast:path={POLICIES / name}" for name in
            ("forecast-fora-layer-3", "forecast-fora-layer-3-dagger", "forecast-fora-layer-3-affine")]
# in the order they run: TaylorSeer at interval 4 first (with the plain model it makes a TaylorSeer frontier that
# reaches the forecast's MACs), then interval 3, then FORA-3 (the forecast's own schedule, reused plainly)
OPPONENTS = ["taylorseer:interval=4,order=1,units=layer", "taylorseer:interval=3,order=1,units=layer",
             "fora:interval=3,unit=layer"]
COMMON = {"model": "fmnist-unet", "steps": 50, "guidance_scale": None, "batch_size": 64, "repeats": 0,
          "experiment": "cqpolicy-bench-rechoose"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/rechoose-unet")
    p.add_argument("--validation-samples", type=int, default=500, help="per validation replicate (default 500)")
    p.add_argument("--validation", type=int, nargs="+", default=[0, 1], help="validation replicate ids")
    p.add_argument("--test", type=int, nargs="+", default=[3, 4, 5], help="unused test replicate ids")
    p.add_argument("--num-samples", type=int, default=1000, help="per test replicate (default 1000)")
    args = p.parse_args(argv)
    out = Path(args.out)
    validation = parse_config({**COMMON, "num_samples": args.validation_samples, "methods": VARIANTS,
                               "replicates": {"role": "validation", "ids": args.validation}}, "rechoose validation")
    run_bench(validation, out / "validation")
    board = pd.read_csv(out / "validation" / "leaderboard.csv")
    scored = board[board["method"].isin(VARIANTS)].set_index("method")["delta_fid"]
    if len(scored) != len(VARIANTS) or scored.isna().any():
        raise BenchError(f"validation rows missing for {sorted(set(VARIANTS) - set(scored.dropna().index))}")
    chosen = str(scored.idxmin())
    choice = {"rule": "lowest mean delta_fid over the validation replicates", "validation": args.validation,
              "validation_samples": args.validation_samples, "delta_fid": scored.to_dict(), "chosen": chosen}
    (out / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
    print(f"chosen on validation replicates {args.validation}: {chosen}", flush=True)
    test = parse_config({**COMMON, "num_samples": args.num_samples, "methods": [chosen] + OPPONENTS,
                         "replicates": {"role": "test", "ids": args.test}}, "rechoose test")
    run_bench(test, out / "test")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, ValueError, FileNotFoundError) as exc:
        print(f"rechoose_forecast: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
