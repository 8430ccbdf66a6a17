#!/usr/bin/env python
"""The README's condensed view of a leaderboard: one row per method, fastest first, specs without their defaults.

    python scripts/readme_table.py out/run/report/leaderboard/leaderboard.csv
    python scripts/readme_table.py docs/results/paper/leaderboard.csv --bold learned

Every number is the leaderboard's own (``cqpolicy leaderboard`` / ``cqpolicy run`` / ``bench_paper.py``); this
only picks columns and shortens the method specs (options at their default dropped, artifact paths shortened to
their folder name).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pandas as pd

from cqpolicy.policies.registry import make_config, parse_spec


def short_spec(spec: str) -> str:
    """``spec`` without the options at their default (the family's first option stays when nothing else does), a
    ``path`` shortened to its last folder and long floats to 3 significant digits."""
    if spec == "baseline":
        return "plain model"
    name, params = parse_spec(spec)
    try:
        fields = dataclasses.fields(type(make_config(name, params)))
    except ValueError:
        return spec
    defaults = {f.name: f.default for f in fields}
    kept = {k: v for k, v in params.items() if defaults.get(k, dataclasses.MISSING) is dataclasses.MISSING
            or not _same(v, defaults[k])}
    if not kept and fields and fields[0].name in params:
        kept = {fields[0].name: params[fields[0].name]}
    return name + (":" + ",".join(f"{k}={_short_value(k, v)}" for k, v in kept.items()) if kept else "")


def _short_value(key: str, value: str) -> str:
    if key == "path":
        return Path(value).name
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if "." in value and len(value) > 6 else value


def _same(text: str, default) -> bool:
    try:
        return type(default)(text) == default if not isinstance(default, bool) else text == str(default)
    except (TypeError, ValueError):
        return False


def _pm(mean, std, digits: int, sign: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if std is None or (isinstance(std, float) and math.isnan(std)) else f"{text} ± {std:.{digits}f}"


def _not_beaten(row) -> str:
    text = row.get("not_beaten_by_margin")
    if isinstance(text, str) and text:
        return text.replace(",", ", ")
    return "none (unopposed)" if isinstance(row.get("unopposed"), str) and row["unopposed"] else "none"


def readme_table(csv: str | Path, bold: str | None = None) -> str:
    table = pd.read_csv(csv).sort_values("macs_speedup", ascending=False)
    lines = ["| method | cache | MACs speedup | wall speedup | FID | ΔFID ± paired std | KID | ΔKID ± paired std | "
             "PSNR (dB) | families it does not beat at ≥ its MACs |", "|" + "---|" * 10]
    for row in table.to_dict("records"):
        name = f"`{short_spec(row['method'])}`"
        if bold and str(row["family"]).startswith(bold):
            name = f"**{name}**"
        plain = row["family"] == "plain"
        lines.append(f"| {name} | {row['cache_dtype']} | {row['macs_speedup']:.2f}× | {row['wall_speedup']:.2f}× | "
                     f"{_pm(row['fid_mean'], row['fid_std'], 2)} | {_pm(row['delta_fid'], row['delta_fid_std'], 2, True)} | "
                     f"{_pm(row['kid_mean'], row['kid_std'], 3)} | {_pm(row['delta_kid'], row['delta_kid_std'], 3, True)} | "
                     f"{'∞' if plain else format(row['psnr_vs_baseline'], '.1f')} | "
                     f"{'–' if plain else _not_beaten(row)} |")
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
