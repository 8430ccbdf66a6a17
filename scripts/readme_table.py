#!/usr/bin/env python
"""The README's condensed view of a leaderboard: one row per method, fastest first, specs without their defaults.

    python scripts/readme_table.py out/run/report/leaderboard/leaderboard.csv
    python scripts/readme_table.py docs/results/paper/leaderboard.csv --bold learned

Every number is the leaderboard's own (``cqpolicy leaderboard`` / ``cqpolicy run`` / ``cqpolicy bench --config``); this
only picks columns and shortens the method specs (options at their default dropped, artifact paths shortened to
their folder name).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from cqpolicy.tracking.names import short_name as short_spec


def _pm(mean, std, digits: int, sign: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if std is None or (isinstance(std, float) and math.isnan(std)) else f"{text} ± {std:.{digits}f}"


def verdict(row) -> str:
    """The leaderboard's frontier verdict (protocol v2): ``beats X, Y; ties Z; loses to W; unopposed V``."""
    parts = []
    for label, column in (("beats", "beats"), ("ties", "ties"), ("loses to", "loses_to"), ("unopposed", "unopposed")):
        text = row.get(column)
        if isinstance(text, str) and text:  # an empty list reads back from the CSV as NaN
            parts.append(f"{label} {text.replace(',', ', ')}")
    return "; ".join(parts) or "–"


def readme_table(csv: str | Path, bold: str | None = None) -> str:
    table = pd.read_csv(csv).sort_values("macs_speedup", ascending=False)
    lines = ["| method | cache | MACs speedup | wall speedup | FID | ΔFID ± paired std | KID | ΔKID ± paired std | "
             "PSNR (dB) | vs. other families' frontiers at its MACs |", "|" + "---|" * 10]
    for row in table.to_dict("records"):
        name = f"`{short_spec(row['method'])}`"
        if bold and str(row["family"]).startswith(bold):
            name = f"**{name}**"
        plain = row["family"] == "plain"
        lines.append(f"| {name} | {row['cache_dtype']} | {row['macs_speedup']:.2f}× | {row['wall_speedup']:.2f}× | "
                     f"{_pm(row['fid_mean'], row['fid_std'], 2)} | {_pm(row['delta_fid'], row['delta_fid_std'], 2, True)} | "
                     f"{_pm(row['kid_mean'], row['kid_std'], 3)} | {_pm(row['delta_kid'], row['delta_kid_std'], 3, True)} | "
                     f"{'∞' if plain else format(row['psnr_vs_baseline'], '.1f')} | "
                     f"{'–' if plain else verdict(row)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="a leaderboard.csv")
    p.add_argument("--bold", default="learned", help="bold the rows whose family starts with this")
    args = p.parse_args(argv)
    if not Path(args.csv).is_file():
        print(f"readme_table: error: {args.csv} not found", file=sys.stderr)
        return 2
    print(readme_table(args.csv, args.bold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
