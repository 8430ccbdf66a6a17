#!/usr/bin/env python
"""Searched schedules and verify-then-forecast on a shipped model, chosen under protocol v2 (issue 31).

Candidates, fixed before any row (per model, in ``PROFILES``):

- the searched front: the (at most 5 fastest) Pareto trials at >= ``min_speedup`` MACs of the model's study
  (``configs/search/fmnist-{dit,unet}-forecast.yaml``: NSGA-II over ``phased`` schedules, a forecast fitted per trial
  on calibration seeds, scored on search seeds), frozen into the paper table's ``policies/search-trial-N``;
- verify, then forecast: the paper table's static forecasts on the fastest FORA schedules with ``verify=tau`` (tau
  from a 32-sample sweep of MACs and held share on validation-role seeds 60.9M+, outside every replicate).

Opponents on the same validation replicates: the plain model, the static forecasts (their frontier is what the rules
measure against) and, on the DiT, FORA 4-6 and TaylorSeer 4-6 for context. The rules, also fixed here:

- A (the noise floor): the fastest candidate whose mean validation ΔFID is at most the plain model's seed-to-seed
  FID std in the paper table (DiT 0.48, UNet 0.28);
- B (what adaptivity adds): the verified candidate with the lowest ΔFID minus the static forecasts' frontier at its
  MACs (linear between the frontier's points, the plain model at 1x);
- C (what the searched schedule adds): the searched candidate with the lowest such margin.

    python benchmarks/research/forecast_schedules.py --out docs/results/forecast-schedules     # resumable
    python benchmarks/research/forecast_schedules.py --model fmnist-unet --out docs/results/forecast-schedules-unet \
        --journal docs/results/forecast-schedules-unet/work/journal.log

A finished choice is final: each searched candidate's artifact then records the search and validation samples it was
scored on (``selected_on``), and the engine refuses to score it on validation replicates again.

Writes OUT/validation/ (an engine folder) and OUT/choice.json; the chosen methods are then scored on the paper
table's test replicates: add them to the model's paper config and
``cqpolicy bench --config configs/fmnist-{dit,unet}-paper.yaml --out docs/results/paper[-unet] --only <chosen>``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cqpolicy.evaluation.engine import BenchError, parse_config, run_bench

PROFILES = {
    "fmnist-dit": {
        "paper": Path("docs/results/paper/policies"), "study": "dit-forecast", "min_speedup": 3.0,
        "space": "configs/search/fmnist-dit-forecast.yaml",
        "static": [f"forecast-fora-{k}" for k in (4, 5, 6, 7)],
        "verified": [f"{name},verify=0.2,check=attn1" for name in ("forecast-fora-6", "forecast-fora-7")],
        "opponents": [f"fora:interval={k}" for k in (4, 5, 6)] + [f"taylorseer:interval={k},order=1" for k in (4, 5, 6)],
        "noise_floor": 0.48,  # the plain model's FID std over the paper table's three test replicates (N = 1000)
    },
    "fmnist-unet": {
        "paper": Path("docs/results/paper-unet/policies"), "study": "unet-forecast", "min_speedup": 2.0,
        "space": "configs/search/fmnist-unet-forecast.yaml",
        "static": ["forecast-fora-layer-3", "forecast-fora-layer-3-affine", "forecast-fora-layer-5",
                   "forecast-fora-layer-5-affine"],
        "verified": [f"forecast-fora-layer-5,verify={tau},check=layer" for tau in (0.1, 0.2)],
        "opponents": [],  # the paper table holds every family; the rules need only the static forecasts
        "noise_floor": 0.28,  # FID 4.15 / 4.66 / 4.20 over the UNet paper table's three test replicates
    },
}
COMMON = {"steps": 50, "guidance_scale": None, "batch_size": 64, "repeats": 0,
          "experiment": "cqpolicy-bench-forecast-schedules"}


def searched_front(journal: Path, study: str, min_speedup: float, limit: int, paper: Path, space: str) -> list[str]:
    """The study's Pareto trials at >= ``min_speedup``, fastest first (at most ``limit``; a schedule drawn twice
    once), frozen under ``paper``, each recording the search seeds it was chosen on."""
    import optuna

    from cqpolicy.policies.artifact import record_selection
    from cqpolicy.search.space import load_space
    from cqpolicy.search.study import make_storage

    searched = load_space(space)

    trials = optuna.load_study(study_name=study, storage=make_storage(str(journal))).best_trials
    front = sorted((t for t in trials if t.values[0] >= min_speedup), key=lambda t: (-t.values[0], t.number))
    front = list({t.user_attrs["schedule"]: t for t in reversed(front)}.values())[::-1][:limit]
    specs = []
    for t in front:
        source = Path(t.user_attrs["policy"].removeprefix("forecast:path="))
        target = paper / f"search-trial-{t.number}"
        if not target.exists():
            shutil.copytree(source, target)
        record_selection(target, searched.seed, searched.num_samples, f"search trial {t.number} of study {study}")
        specs.append(f"forecast:path={target}")
    return specs


def _full(spec: str) -> str:
    """The spec as the leaderboard logs it (every option spelled out)."""
    from cqpolicy.policies import make_policy
    from cqpolicy.policies.registry import spec_string

    return spec_string(make_policy(spec))


def margin_to(board: pd.DataFrame, method: str, frontier: list[str]) -> float:
    """``method``'s ΔFID minus the frontier of ``frontier``'s rows (and the plain model at 1x) at its MACs."""
    rows = board.set_index("method")
    points = [(1.0, 0.0)] + [(rows.at[m, "macs_speedup"], rows.at[m, "delta_fid"]) for m in frontier]
    best, pareto = np.inf, []
    for x, y in sorted(points, key=lambda p: -p[0]):  # keep the points no faster point beats
        if y < best:
            pareto.append((x, y))
            best = y
    xs, ys = zip(*sorted(pareto))
    x = rows.at[method, "macs_speedup"]
    if x > xs[-1]:
        return float("nan")  # the frontier does not reach it: unopposed
    return float(rows.at[method, "delta_fid"] - np.interp(x, xs, ys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PROFILES), default="fmnist-dit")
    p.add_argument("--out", default="docs/results/forecast-schedules")
    p.add_argument("--journal", default="out/search/dit-forecast/journal.log")
    p.add_argument("--study", default=None, help="the study's name (default: the model's, e.g. dit-forecast)")
    p.add_argument("--validation-samples", type=int, default=250, help="per validation replicate (default 250)")
    p.add_argument("--validation", type=int, nargs="+", default=[0, 1], help="validation replicate ids")
    p.add_argument("--fixed-only", action="store_true",
                   help="bench the candidates that do not depend on the study (while it runs) and stop")
    args = p.parse_args(argv)
    profile = PROFILES[args.model]
    out, paper = Path(args.out), profile["paper"]
    static = [f"forecast:path={paper / name}" for name in profile["static"]]
    verified = [f"forecast:path={paper / name}" for name in profile["verified"]]
    searched = [] if args.fixed_only else searched_front(Path(args.journal), args.study or profile["study"],
                                                         profile["min_speedup"], 5, paper, profile["space"])
    methods = static + profile["opponents"] + searched + verified
    validation = parse_config({**COMMON, "model": args.model, "num_samples": args.validation_samples, "methods": methods,
                               "replicates": {"role": "validation", "ids": args.validation}}, "validation")
    run_bench(validation, out / "validation")
    if args.fixed_only:
        return 0
    board = pd.read_csv(out / "validation" / "leaderboard.csv")
    board = board[board["method"].isin(canonical := {_full(m): m for m in methods})]
    board = board.assign(method=board["method"].map(canonical))  # the specs as written here
    missing = sorted(set(methods) - set(board.dropna(subset=["delta_fid"])["method"]))
    if missing:
        raise BenchError(f"validation rows missing for {missing}")
    rows = board.set_index("method")
    floor = profile["noise_floor"]
    inside = [m for m in searched + verified if rows.at[m, "delta_fid"] <= floor]
    margins = {m: margin_to(board, m, static) for m in searched + verified}
    choice = {
        "validation": args.validation, "validation_samples": args.validation_samples, "model": args.model, "noise_floor": floor,
        "candidates": {m: {"macs_speedup": float(rows.at[m, "macs_speedup"]),
                           "delta_fid": float(rows.at[m, "delta_fid"]), "margin_to_static": margins[m]}
                       for m in searched + verified},
        "A_fastest_inside_noise": max(inside, key=lambda m: rows.at[m, "macs_speedup"]) if inside else None,
        "B_verified": min(verified, key=lambda m: np.nan_to_num(margins[m], nan=np.inf)),
        "C_searched": min(searched, key=lambda m: np.nan_to_num(margins[m], nan=np.inf)) if searched else None,
    }
    (out / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
    from cqpolicy import seeds
    from cqpolicy.policies.artifact import record_selection
    from cqpolicy.policies.registry import parse_spec

    # each searched candidate was scored here to be chosen or not: its artifact says on which samples (a verified
    # candidate is an option of a shared artifact, its threshold set off the replicates: nothing to record)
    for spec in searched:
        for k in args.validation:
            record_selection(parse_spec(spec)[1]["path"], seeds.replicate_start("validation", k),
                             args.validation_samples, f"forecast_schedules.py candidates ({args.model})")
    print(json.dumps(choice, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, ValueError, FileNotFoundError) as exc:
        print(f"forecast_schedules: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
