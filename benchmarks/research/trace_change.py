"""How fast each embedded model's cached units change along sampling, from uncached trace runs.

For each trace run (any model) and each fifth of sampling progress: the median step-to-step change of the units'
outputs (``out_rel_l1_prev``, relative L1 against the previous step) and the median local impact of forcing one
reuse (``impact_local``, where probed), over every sample, CFG branch, block and unit. One CSV row per (run, fifth), with ``--by-unit`` per (run,
unit type, fifth); docs/results-sd3.md renders both.

    .venv/bin/python benchmarks/research/trace_change.py --run fmnist-dit=out/run/traces/none \
        --run fmnist-unet=traces/unet --run fmnist-sd3=out/run-sd3/traces/none --out docs/results/fmnist-sd3/trace-change.csv
    .venv/bin/python benchmarks/research/trace_change.py --by-unit --run fmnist-sd3=out/run-sd3/traces/none \
        --out docs/results/fmnist-sd3/trace-change-units.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from cqpolicy.tracing import TraceReader

FIFTHS = 5


def summarise(label: str, run_dir: str, by_unit: bool = False) -> list[dict]:
    reader = TraceReader(run_dir)
    wanted = [c for c in ("seed", "step", "unit", "out_rel_l1_prev", "impact_local") if c in reader.columns]
    frame = reader.table(wanted).to_pandas()
    steps = int(frame["step"].max()) + 1
    fifth = np.minimum((frame["step"].to_numpy() * FIFTHS) // steps, FIFTHS - 1)
    rows = []
    for unit in sorted(frame["unit"].unique()) if by_unit else [None]:
        for k in range(FIFTHS):
            part = frame[(fifth == k) & ((frame["unit"] == unit) if unit is not None else True)]
            change = part["out_rel_l1_prev"].dropna()
            impact = part["impact_local"].dropna() if "impact_local" in part else part.iloc[0:0]
            rows.append({"model": label, **({"unit": unit} if by_unit else {}), "steps": steps,
                         "progress": f"{k / FIFTHS:.1f}-{(k + 1) / FIFTHS:.1f}",
                         "samples": int(part["seed"].nunique()),
                         "median_output_change": f"{change.median():.4f}" if len(change) else "",
                         "median_reuse_impact": f"{impact.median():.5f}" if len(impact) else ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=TRACE_RUN_DIR (repeat)")
    parser.add_argument("--by-unit", action="store_true", help="one row per unit type and fifth")
    parser.add_argument("--out", required=True, help="CSV to write")
    args = parser.parse_args()
    rows = []
    for item in args.run:
        label, _, run_dir = item.partition("=")
        if not run_dir or not Path(run_dir).is_dir():
            raise SystemExit(f"trace_change: --run {item!r}: expected LABEL=an existing trace run folder")
        rows += summarise(label, run_dir, args.by_unit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
