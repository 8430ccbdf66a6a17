"""The leaderboard: every bench / search run in MLflow, grouped per method, with per-family frontiers.

``collect_rows`` reads the finished runs (one row per run), ``leaderboard`` groups the runs of the same
(model, steps, num_samples, method, cache_dtype, weights) over seeds (FID / KID mean ± std, ΔFID / ΔKID against the
baseline run of the same seed with their paired std, mean costs), flags the (MACs speedup ↑, FID ↓)
Pareto-optimal methods of each setting and gives each method a "families are frontiers" verdict (DESIGN.md
§4, protocol v2): per other family, is it below, on or above that family's frontier interpolated at its MACs
speedup, by more than 2 standard errors of the per-replicate differences? A row on quantized weights (``weights``
other than ``fp``) belongs to its policy's family tagged with the weights, e.g. ``fora+int8``, so a joint row is
judged against every other family's frontier, the full-precision one of its own policy included.
``write_leaderboard`` writes ``leaderboard.md``, ``leaderboard.csv`` and ``pareto.png`` into a folder that is either
complete or absent.
"""
from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cqpolicy.tracking.mlflow_store import tracking_uri

BASELINE = "baseline"  # the uncached run's method name
PLAIN = "plain"  # ... and its family
DEFAULT_PREFIXES = ("cqpolicy-bench", "cqpolicy-search")
SETTING = ["model", "steps", "num_samples"]
GROUP = SETTING + ["method", "cache_dtype", "weights"]
NO_CACHE = "none"  # the baseline's cache_dtype in the leaderboard: it caches nothing
FP_WEIGHTS = "fp"  # the unquantized model's weights; runs that logged no weights group with it
METRICS = ("macs_speedup", "wall_speedup", "fid", "kid", "psnr_vs_baseline", "ssim_vs_baseline", "reuse_ratio",
           "cache_bytes", "class_accuracy", "macs_per_image", "bit_identical", "calibration_macs", "model_bytes",
           "compression_ratio")
MEANS = ("macs_speedup", "wall_speedup", "psnr_vs_baseline", "ssim_vs_baseline", "cache_bytes", "reuse_ratio",
         "class_accuracy", "macs_per_image", "bit_identical", "calibration_macs", "model_bytes", "compression_ratio")
COLUMNS = (GROUP + ["name", "family", "n_runs", "n_seeds", "n_fid_seeds", "seeds", "fid_mean", "fid_std", "delta_fid",
                    "delta_fid_std", "kid_mean", "kid_std", "delta_kid", "delta_kid_std"] + list(MEANS)
           + ["wall_flag", "pareto", "beats_all", "beats", "ties", "loses_to", "unopposed", "vs_frontiers",
              "experiments", "run_ids"])


def derived_family(method) -> str | None:
    """The family of a run that logged none (runs older than the ``family`` param): ``plain`` for the
    baseline, else the spec's name before ``:``."""
    if not isinstance(method, str):
        return None
    return PLAIN if method == BASELINE else method.split(":", 1)[0]


def _families(method: pd.Series, logged: pd.Series | None) -> pd.Series:
    """The logged family where there is one (and not blank), the derived one otherwise; the baseline's is
    always ``plain``."""
    derived = method.map(derived_family)
    if logged is None:
        return derived
    logged = logged.where(logged.map(lambda f: isinstance(f, str) and f.strip() != ""), None)
    family = logged.where(logged.notna(), derived)
    return family.where(method != BASELINE, PLAIN)


# ----------------------------------------------------------------------------------------------- Pareto
def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """``[n, k]`` objectives -> bool ``[n]``: True where no other point is at least as good in every
    objective and strictly better in one. A NaN in any objective makes a point non-optimal (and it
    dominates nothing); exact duplicates of an optimal point are all optimal."""
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"pareto_mask needs an [n, k] array, got shape {points.shape}")
    signs = np.asarray([1.0 if m else -1.0 for m in maximize])
    if signs.shape != (points.shape[1],):
        raise ValueError(f"maximize has {len(signs)} entries for {points.shape[1]} objectives")
    valid = ~np.isnan(points).any(axis=1)
    score = points[valid] * signs  # larger is better in every column
    # dominated[i] = some j with score[j] >= score[i] everywhere and > somewhere
    ge = (score[:, None, :] >= score[None, :, :]).all(axis=2)  # [j, i]
    gt = (score[:, None, :] > score[None, :, :]).any(axis=2)
    dominated = (ge & gt).any(axis=0)
    mask = np.zeros(len(points), dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


# ------------------------------------------------------------------------------------------------ runs
def _no_runs_error(uri: str) -> ValueError:
    return ValueError(f"no bench or search runs in MLflow at {uri}; run `cqpolicy bench` first")


def collect_rows(experiments: list[str] | None = None, tags: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per finished run of ``experiments`` (default: every experiment named ``cqpolicy-bench*`` or
    ``cqpolicy-search*``) carrying all of ``tags``: experiment, run_id, method, family (the ``family`` param;
    for older runs ``plain`` for the baseline, else the spec's name before ``:``), cache_dtype, weights (None where
    not logged), model, steps, num_samples, seed and the bench metrics (NaN where a run did not log one, e.g.
    ``kid`` in older runs)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    known = {e.name: e.experiment_id for e in mlflow.search_experiments()}
    if experiments is None:
        names = sorted(n for n in known if n.startswith(DEFAULT_PREFIXES))
    else:
        names = list(dict.fromkeys(experiments))
        for name in names:
            if name not in known:
                listing = ", ".join(sorted(known)) or "(none)"
                raise ValueError(f"no MLflow experiment named {name!r} at {uri}; known: {listing}")
    if not names:
        raise _no_runs_error(uri)
    where = ["attributes.status = 'FINISHED'"] + [f"tags.{k} = '{v}'" for k, v in (tags or {}).items()]
    runs = mlflow.search_runs(experiment_ids=[known[n] for n in names], filter_string=" and ".join(where),
                              output_format="pandas")
    if runs.empty:
        raise _no_runs_error(uri)

    def column(name):
        return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)

    by_id = {known[n]: n for n in names}
    # bench rows carry the full spec in policy_config; search trials log it as "policy"
    method = column("params.policy_config").where(column("params.policy_config").notna(), column("params.policy"))
    out = pd.DataFrame({
        "experiment": runs["experiment_id"].map(by_id),
        "run_id": runs["run_id"],
        "method": method,
        "family": _families(method, column("params.family")),
        "cache_dtype": column("params.cache_dtype"),
        "weights": column("params.weights"),
        "wall_flag": column("params.wall_flag"),
        "model": column("params.model"),
        "steps": pd.to_numeric(column("params.steps"), errors="coerce").astype("Int64"),
        "num_samples": pd.to_numeric(column("params.num_samples"), errors="coerce").astype("Int64"),
        "seed": pd.to_numeric(column("params.seed"), errors="coerce").astype("Int64"),
    })
    for name in METRICS:
        out[name] = pd.to_numeric(column(f"metrics.{name}"), errors="coerce").astype(float)
    # non-finite metrics are not logged: a bit-identical run's PSNR is +inf
    out.loc[out["psnr_vs_baseline"].isna() & (out["bit_identical"] == 1), "psnr_vs_baseline"] = math.inf
    out = out[out["method"].notna()]  # e.g. a search's parent run, which names no policy
    if out.empty:
        raise _no_runs_error(uri)
    return out.sort_values(["experiment", "model", "steps", "num_samples", "method", "seed"],
                           na_position="last").reset_index(drop=True)


# ----------------------------------------------------------------------------------------- leaderboard
def _key(values) -> tuple:
    """A hashable group key with every missing value spelled the same (NaN / None / pd.NA)."""
    return tuple(None if pd.isna(v) else v for v in values)


def _sample_std(values) -> float:
    """Sample std (ddof 1); NaN with fewer than two values."""
    values = np.asarray(values, dtype=float)
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _per_seed(group: pd.DataFrame, name: str) -> pd.Series:
    """seed -> the metric (repeated runs of a seed: their mean), seeds without it dropped."""
    return group.groupby("seed", dropna=False)[name].mean().dropna()


def _paired_deltas(per_seed: pd.Series, base: dict, setting: tuple) -> np.ndarray:
    """Per-seed metric minus the same-seed baseline's, over the seeds both have."""
    return np.asarray([v - base[_key(setting + (seed,))] for seed, v in per_seed.items()
                       if _key(setting + (seed,)) in base], dtype=float)


def _spread_std(values: pd.Series) -> float:
    """fid_std / kid_std: sample std over seeds, 0 for one seed, NaN for none."""
    return float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)


def _short_names(methods: pd.Series) -> pd.Series:
    """``names.short_name`` of each method (imported here: it loads the policy registry, and torch with it)."""
    from cqpolicy.tracking.names import short_name

    return methods.map(lambda m: short_name(m) if isinstance(m, str) else m)


def _frontier_points(setting: pd.DataFrame, family: str, plain: int | None) -> list[tuple[float, int]]:
    """``family``'s frontier in ``setting`` as (MACs speedup, row index) sorted by speedup: its Pareto-optimal rows
    (MACs speedup ↑, mean FID ↓) at >= 1x, plus the plain row at 1x (the family's setting that never reuses); at
    equal speedups the lower mean FID stands (plain on a tie). Rows without a speedup or a FID take no part."""
    rows = setting[setting["family"].astype(str) == family]
    mask = pareto_mask(rows[["macs_speedup", "fid_mean"]].to_numpy(dtype=float), [True, False])
    points = [(float(m), j, float(rows.at[j, "fid_mean"]), 1) for j, m in rows["macs_speedup"][mask].items() if m >= 1]
    if plain is not None and not math.isnan(setting.at[plain, "fid_mean"]):
        points.append((1.0, plain, float(setting.at[plain, "fid_mean"]), 0))
    points.sort(key=lambda p: (p[0], p[2], p[3]))
    kept: list[tuple[float, int]] = []
    for m, j, _, _ in points:
        if not kept or kept[-1][0] != m:
            kept.append((m, j))
    return kept


def _frontier_at(points: list[tuple[float, int]], m: float, per_seed_fid: list[pd.Series]) -> pd.Series | None:
    """Per replicate, the frontier's FID at MACs speedup ``m`` (clamped at 1x), linear in log(speedup) between the
    two points around it, over the replicates both points have; None when ``m`` is outside the frontier."""
    m = max(m, 1.0)
    xs = [x for x, _ in points]
    k = bisect.bisect_left(xs, m)
    if k == len(xs) or (k == 0 and xs[0] != m):
        return None
    if xs[k] == m:
        return per_seed_fid[points[k][1]]
    (x0, j0), (x1, j1) = points[k - 1], points[k]
    t = (math.log(m) - math.log(x0)) / (math.log(x1) - math.log(x0))
    lo, hi = per_seed_fid[j0], per_seed_fid[j1]
    shared = lo.index.intersection(hi.index)
    return lo[shared] + t * (hi[shared] - lo[shared])


def _versus_frontier(fid: pd.Series, frontier: pd.Series | None) -> tuple[float, float, int]:
    """(mean, standard error, n) of the per-replicate differences row minus frontier over the replicates both have
    (NaN mean without any, NaN SE with fewer than two)."""
    if frontier is None:
        return math.nan, math.nan, 0
    shared = fid.index.intersection(frontier.index)
    d = fid[shared].to_numpy(dtype=float) - frontier[shared].to_numpy(dtype=float)
    if not len(d):
        return math.nan, math.nan, 0
    return float(d.mean()), _sample_std(d) / math.sqrt(len(d)), len(d)


def _verdict(mean: float, se: float, n: int) -> str:
    """``beats`` / ``loses_to`` when the mean difference is beyond 2 SE on its side (n >= 2), else ``ties``."""
    if n < 2:
        return "ties"
    if mean < 0 and mean < -2 * se:
        return "beats"
    if mean > 0 and mean > 2 * se:
        return "loses_to"
    return "ties"


VERDICTS = ["beats", "ties", "loses_to", "unopposed", "beats_all", "vs_frontiers"]


def _verdicts(table: pd.DataFrame, per_seed_fid: list[pd.Series]) -> pd.DataFrame:
    """The protocol-v2 "families are frontiers" verdict (DESIGN.md §4) of every non-plain row against every other
    non-plain family G of its setting: unopposed when the row is faster than G's fastest frontier point (plain
    included), else the per-replicate differences row minus G's frontier interpolated at the row's speedup
    (``_frontier_at``) beat / tie / lose by 2 standard errors (``_verdict``). ``vs_frontiers``:
    ``G:mean:se:n`` per opposed G. A row without a speedup ties every family; plain rows get no verdict."""
    out = {name: pd.Series("", index=table.index, dtype=object) for name in VERDICTS}
    out["beats_all"] = pd.Series(False, index=table.index)
    for _, setting in table.groupby(SETTING, dropna=False, sort=False):
        fam = setting["family"].astype(str)
        plains = setting.index[fam == PLAIN]
        plain = plains[0] if len(plains) else None
        families = sorted(set(fam) - {PLAIN})
        frontiers = {g: _frontier_points(setting, g, plain) for g in families}
        for i in setting.index:
            if fam[i] == PLAIN:
                continue
            m = float(setting.at[i, "macs_speedup"])
            lists = {"beats": [], "ties": [], "loses_to": [], "unopposed": []}
            numbers = []
            for g in families:
                if g == fam[i]:
                    continue
                points = frontiers[g]
                if not math.isnan(m) and (not points or m > points[-1][0]):
                    lists["unopposed"].append(g)
                    continue
                frontier = None if math.isnan(m) else _frontier_at(points, m, per_seed_fid)
                mean, se, n = _versus_frontier(per_seed_fid[i], frontier)
                lists[_verdict(mean, se, n)].append(g)
                numbers.append(f"{g}:{mean:.4f}:{se:.4f}:{n}")
            for name, names in lists.items():
                out[name][i] = ",".join(names)
            opposed = len(families) - 1 - len(lists["unopposed"])
            out["beats_all"][i] = opposed > 0 and len(lists["beats"]) == opposed
            out["vs_frontiers"][i] = ";".join(numbers)
    return pd.DataFrame(out)


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, steps, num_samples, method, cache_dtype, weights), with

    - ``weights``: ``fp`` or a quantized model's label (runs that logged none group with ``fp`` and show None
      unless a run of the group logged it);
    - ``family``: the logged family (older runs: ``plain`` for the baseline, else the spec's name before
      ``:``), ``+<weights>`` on quantized weights; ``seeds``: the sorted seeds, space-separated; n_runs, n_seeds,
      n_fid_seeds;
    - ``fid_mean`` / ``fid_std`` and ``kid_mean`` / ``kid_std``: mean and sample std over seeds of the
      per-seed value (repeats of a seed averaged first; std 0 for one seed);
    - ``delta_fid`` / ``delta_kid``: mean over seeds of the per-seed value minus the same-seed baseline's,
      ``delta_fid_std`` / ``delta_kid_std``: the sample std of those paired differences (NaN with fewer than
      two paired seeds; the baseline's own deltas are 0 ± 0);
    - the means over runs of the costs and fidelity (``MEANS``, including ``calibration_macs``, ``model_bytes``
      and ``compression_ratio``);
    - ``pareto``: not dominated in (MACs speedup ↑, FID mean ↓) within the setting, baseline included at
      speedup 1;
    - ``name``: the short method name (``names.short_name``: the spec without its defaults);
    - ``beats`` / ``ties`` / ``loses_to`` / ``unopposed`` / ``beats_all`` / ``vs_frontiers``: the frontier verdict
      (``_verdicts``);
    - the experiments and run ids.

    Sorted per setting: Pareto-optimal first, then MACs speedup descending."""
    if df is None or len(df) == 0:
        raise _no_runs_error(tracking_uri())
    work = df.copy()
    for name in METRICS + ("seed", "cache_dtype", "model", "steps", "num_samples", "weights"):
        if name not in work.columns:
            work[name] = np.nan
    work["family"] = _families(work["method"], work["family"] if "family" in work.columns else None)
    # runs from before weights were logged ran the unquantized model: they group with "fp" (shown as logged)
    logged_weights = work["weights"].map(lambda w: isinstance(w, str) and w != "")
    work["weights"] = work["weights"].where(logged_weights, FP_WEIGHTS)
    quantized = work["weights"] != FP_WEIGHTS
    work.loc[quantized, "family"] = work.loc[quantized, "family"] + "+" + work.loc[quantized, "weights"]
    is_base = work["method"] == BASELINE
    work.loc[is_base, "cache_dtype"] = NO_CACHE
    work.loc[is_base, "macs_speedup"] = work.loc[is_base, "macs_speedup"].fillna(1.0)

    # the baseline FID / KID of each (model, steps, num_samples, seed)
    base = {"fid": {}, "kid": {}}
    for key, group in work[is_base].groupby(SETTING + ["seed"], dropna=False):
        for name, values in base.items():
            value = group[name].mean()
            if not math.isnan(value):
                values[_key(key)] = value

    records, per_seed_fid = [], []
    for key, group in work.groupby(GROUP, dropna=False, sort=False):
        setting = tuple(key[:3])
        per_seed = group.groupby("seed", dropna=False)
        fids, kids = _per_seed(group, "fid"), _per_seed(group, "kid")
        d_fid, d_kid = _paired_deltas(fids, base["fid"], setting), _paired_deltas(kids, base["kid"], setting)
        families = group["family"].dropna()
        record = dict(zip(GROUP, key))
        record["weights"] = record["weights"] if logged_weights[group.index].any() else None
        record.update({
            "family": families.mode().iloc[0] if len(families) else None,
            "n_runs": len(group),
            "n_seeds": int(per_seed.ngroups),
            "n_fid_seeds": len(fids),
            "seeds": " ".join(str(int(s)) for s in sorted(group["seed"].dropna().unique())),
            "fid_mean": float(fids.mean()) if len(fids) else math.nan,
            "fid_std": _spread_std(fids),
            "delta_fid": float(np.mean(d_fid)) if len(d_fid) else math.nan,
            "delta_fid_std": _sample_std(d_fid),
            "kid_mean": float(kids.mean()) if len(kids) else math.nan,
            "kid_std": _spread_std(kids),
            "delta_kid": float(np.mean(d_kid)) if len(d_kid) else math.nan,
            "delta_kid_std": _sample_std(d_kid),
        })
        for name in MEANS:
            values = group[name].dropna()
            # np.mean keeps +inf (a bit-identical PSNR) as +inf
            record[name] = float(np.mean(values.to_numpy())) if len(values) else math.nan
        flags = group["wall_flag"].dropna() if "wall_flag" in group else []
        record["wall_flag"] = ",".join(sorted({f for f in flags if isinstance(f, str) and f}))  # any replicate's
        record["experiments"] = ",".join(sorted(set(group["experiment"].dropna()))) if "experiment" in group else ""
        record["run_ids"] = ",".join(group["run_id"]) if "run_id" in group else ""
        records.append(record)
        per_seed_fid.append(fids)
    table = pd.DataFrame.from_records(records)
    table["pareto"] = False
    for _, group in table.groupby(SETTING, dropna=False, sort=False):
        mask = pareto_mask(group[["macs_speedup", "fid_mean"]].to_numpy(dtype=float), [True, False])
        table.loc[group.index, "pareto"] = mask
    table = table.join(_verdicts(table, per_seed_fid))
    table["name"] = _short_names(table["method"])
    table = table[COLUMNS].sort_values(SETTING + ["pareto", "macs_speedup", "fid_mean", "method"],
                                       ascending=[True, True, True, False, False, True, True], na_position="last",
                                       kind="stable")
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- files
def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return format(value, spec) + suffix


def _pm(mean, std, spec: str) -> str:
    """``mean ± std``; ``mean`` alone without a std, ``–`` without a mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return _fmt(mean, spec)
    return f"{_fmt(mean, spec)} ± {_fmt(std, spec.lstrip('+'))}"


def _decimals(values, digits: int = 3) -> int:
    """Fixed decimals that give the largest finite |value| ``digits`` significant digits (KID's scale
    depends on the feature space), so a column's means and stds line up and float noise prints as 0."""
    values = np.abs(np.asarray(values, dtype=float))
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return 4
    return int(min(10, max(0, digits - 1 - math.floor(math.log10(values.max())))))


def _setting_title(key) -> str:
    model, steps, num_samples = ("?" if pd.isna(v) else v for v in key)
    return f"{model} · {steps} steps · {num_samples} samples"


def _listed(value) -> list[str]:
    """A comma-separated family list (a CSV read back gives NaN for an empty one)."""
    return [v for v in value.split(",") if v] if isinstance(value, str) else []


def _star(r, families: set) -> str:
    """★ when the row beats every opposed family (at least one); "unopposed" when every other family is unopposed
    at its MACs speedup, so there was nothing to beat (``families``: the setting's non-plain families)."""
    if r.beats_all:
        return "★"
    others = families - {r.family}
    return "unopposed" if others and set(_listed(r.unopposed)) >= others else ""


def _wall(r) -> str:
    """The wall speedup, with its flag when the timing was not the protocol's (load, or the quality passes)."""
    flag = getattr(r, "wall_flag", "")
    return _fmt(r.wall_speedup, ".2f", "×") + (f" ({flag})" if isinstance(flag, str) and flag else "")


def _versus(r) -> str:
    """``beats X, Y; ties Z; loses to W; unopposed V`` (empty parts left out)."""
    parts = [(label, _listed(getattr(r, column))) for label, column in
             (("beats", "beats"), ("ties", "ties"), ("loses to", "loses_to"), ("unopposed", "unopposed"))]
    return "; ".join(f"{label} {', '.join(names)}" for label, names in parts if names)


FOOTNOTE = (
    "FID / KID ± sample std over seeds (n = seeds with a FID; KID is unbiased, in the same classifier feature "
    "space as FID). ΔFID / ΔKID = mean over seeds of the value minus the same-seed baseline's ± the sample std "
    "of those paired differences (no ± with fewer than two paired seeds). Pareto = not dominated in "
    "(MACs speedup ↑, FID ↓) within the setting. **Versus other families** (protocol v2): a family's frontier is "
    "its Pareto-optimal rows (MACs speedup ↑, mean FID ↓) plus the uncached `plain` model at 1×; per seed, its "
    "FID at a row's MACs speedup is interpolated linearly in log(MACs speedup) between the two frontier points around "
    "it (rows below 1× are compared at 1×). Over the seeds the row and those points share, d = row FID minus "
    "frontier FID: the row *beats* the family when mean d < −2 SE (SE = sample std of d / √n, n ≥ 2), *loses to* "
    "it when mean d > 2 SE, and *ties* it otherwise. A family whose fastest frontier point is slower than the "
    "row is *unopposed* there: listed, never counted as beaten. **Beats all** (★) = beats every opposed family "
    "(at least one; `plain` is no family to beat); \"unopposed\" = no other family reaches the row's MACs "
    "speedup. The CSV's `vs_frontiers` holds family:mean d:SE:n per opposed family. A wall speedup followed by "
    "(load) was timed while the plain model's time drifted from the run's median and never settled, (quality-pass) "
    "from the quality passes rather than interleaved pairs: read those loosely.")


WEIGHTS_NOTE = (
    " **Weights**: `fp` = the unquantized model; a row on quantized weights belongs to its policy's family "
    "tagged with them (`fora+int8`) and its ΔFID is against the unquantized uncached model; model MiB counts "
    "every stored byte (scales and code tables included), compression is against float32.")


def markdown(table: pd.DataFrame) -> str:
    """The leaderboard as markdown: one table per (model, steps, num_samples)."""
    header = ("| method | family | params | weights | MACs speedup | wall speedup | FID ± std (n) "
              "| ΔFID ± paired std | KID ± std | ΔKID ± paired std | PSNR (dB) | calib. MACs | cache MiB | model MiB | compression "
              "| Pareto | beats all | vs. other families | runs |")
    out = ["# cqpolicy leaderboard", ""]
    for key, group in table.groupby(SETTING, dropna=False, sort=False):
        out += [f"## {_setting_title(key)}", "", header, "|" + "---|" * (header.count("|") - 1)]
        kid = f".{_decimals(group['kid_mean'], 4)}f"
        families = set(group["family"].dropna().astype(str)) - {PLAIN}
        for r in group.itertuples(index=False):
            fid = "–" if math.isnan(r.fid_mean) else f"{_pm(r.fid_mean, r.fid_std, '.2f')} ({r.n_fid_seeds})"
            cache = None if math.isnan(r.cache_bytes) else r.cache_bytes / 2**20
            size = None if math.isnan(r.model_bytes) else r.model_bytes / 2**20
            runs = ", ".join(run[:8] for run in str(r.run_ids).split(",") if run)
            method = str(r.name if isinstance(r.name, str) else r.method).replace("|", "\\|")
            out.append(f"| `{method}` | {'–' if pd.isna(r.family) else r.family} | "
                       f"{'–' if pd.isna(r.cache_dtype) else r.cache_dtype} | "
                       f"{'–' if pd.isna(r.weights) else r.weights} | "
                       f"{_fmt(r.macs_speedup, '.2f', '×')} | {_wall(r)} | {fid} | "
                       f"{_pm(r.delta_fid, r.delta_fid_std, '+.2f')} | {_pm(r.kid_mean, r.kid_std, kid)} | "
                       f"{_pm(r.delta_kid, r.delta_kid_std, '+' + kid)} | {_fmt(r.psnr_vs_baseline, '.1f')} | "
                       f"{_fmt(r.calibration_macs, '.3g')} | {_fmt(cache, '.2f')} | {_fmt(size, '.2f')} | "
                       f"{_fmt(r.compression_ratio, '.2f', '×')} | {'✓' if r.pareto else ''} | "
                       f"{_star(r, families)} | {_versus(r)} | {runs} |")
        out.append("")
    quantized = table["weights"].notna() & (table["weights"] != FP_WEIGHTS)
    out.append(FOOTNOTE + (WEIGHTS_NOTE if quantized.any() else ""))  # tables without them read as before
    return "\n".join(out) + "\n"


def _frontier(xs: np.ndarray, ys: np.ndarray):
    """The Pareto-optimal points (x ↑, y ↓) sorted by x, for a step line."""
    points = np.column_stack([xs, ys])
    keep = pareto_mask(points, [True, False])
    order = np.argsort(xs[keep], kind="stable")
    return xs[keep][order], ys[keep][order]


def _family_styles(families: list[str]) -> dict[str, tuple[str, str]]:
    """family -> (colour, marker); learned families first, so they get the first (strongest) colours."""
    from matplotlib import colormaps

    ordered = sorted(families, key=lambda f: (not f.startswith("learned"), f))
    palette = [f"C{i}" for i in range(10)] if len(ordered) <= 10 else [colormaps["tab20"](i) for i in range(20)]
    markers = "oDs^v<>phX*P"
    return {f: (palette[i % len(palette)], markers[i % len(markers)]) for i, f in enumerate(ordered)}


def _panel(ax, group: pd.DataFrame, metric: str, styles: dict, handles: dict) -> None:
    """One setting, one metric (``fid`` / ``kid``): Δ against the baseline (mean ± paired std) where there
    is one, the raw value (mean ± std over seeds) otherwise, against MACs speedup on a log axis; each family's
    frontier as the verdict reads it (its Pareto-optimal points from the plain model on, straight in log MACs),
    the plain model at (1, 0) (or its raw value), the global Pareto frontier dashed."""
    name = metric.upper()
    delta = group[f"delta_{metric}"].to_numpy(dtype=float)
    fam = group["family"].astype(str).to_numpy()
    x = group["macs_speedup"].to_numpy(dtype=float)
    names = (group["name"] if "name" in group else group["method"]).astype(str).to_numpy()
    use_delta = bool(np.isfinite(delta[fam != PLAIN]).any())
    if use_delta:
        y, err = delta.copy(), np.nan_to_num(group[f"delta_{metric}_std"].to_numpy(dtype=float))
        ylabel = f"Δ{name} vs. uncached, same seeds\n(mean ± paired std, lower is better)"
    else:
        y, err = group[f"{metric}_mean"].to_numpy(dtype=float), np.nan_to_num(
            group[f"{metric}_std"].to_numpy(dtype=float))
        ylabel = f"{name} (mean ± std over seeds, lower is better)"
    base = fam == PLAIN
    if use_delta:
        x, y = x.copy(), y.copy()
        x[base], y[base], err[base] = 1.0, 0.0, 0.0
    for f, (colour, marker) in styles.items():
        sel = fam == f
        if not sel.any():
            continue
        learned = f.startswith("learned")
        h = ax.errorbar(x[sel], y[sel], yerr=err[sel], fmt=marker, color=colour, ms=8 if learned else 6,
                        mfc=colour if learned else "white", mew=1.6 if learned else 1.2, capsize=3,
                        elinewidth=1.4 if learned else 0.9, alpha=0.95 if learned else 0.8,
                        zorder=4 if learned else 3, label=f)
        handles.setdefault(f, h)
        fx, fy = _frontier(x[sel], y[sel])
        if base.any() and np.isfinite(y[base]).any():  # every family's frontier starts at the plain model
            fx, fy = np.concatenate([x[base][:1], fx]), np.concatenate([y[base][:1], fy])
        if len(fx) > 1:
            ax.plot(fx, fy, color=colour, lw=2.6 if learned else 1.1, alpha=0.9 if learned else 0.6,
                    zorder=3.5 if learned else 2)
    gx, gy = _frontier(x, y)
    if len(gx):
        h = ax.plot(gx, gy, drawstyle="steps-pre", color="black", lw=1.6, ls="--", zorder=1.5,
                    label="global Pareto frontier")[0]
        handles.setdefault("global Pareto frontier", h)
        h = ax.scatter(gx, gy, s=170, facecolors="none", edgecolors="black", lw=1.4, zorder=5, label="Pareto-optimal")
        handles.setdefault("Pareto-optimal", h)
        _label_frontier(ax, x, y, names, base)
    if base.any() and np.isfinite(y[base]).any():
        h = ax.errorbar(x[base], y[base], yerr=err[base], fmt="*", color="crimson", ms=16, mec="black", capsize=3,
                        zorder=6, label="plain (uncached)")
        handles.setdefault("plain (uncached)", h)
    if use_delta:
        ax.axhline(0.0, color="crimson", lw=0.8, ls=":", alpha=0.7)
    ax.axvline(1.0, color="crimson", lw=0.8, ls=":", alpha=0.5)
    if not np.isfinite(y).any():
        ax.text(0.5, 0.5, f"no {name} logged" + (" (bench --fid)" if metric == "fid" else ""),
                transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xscale("log")
    ticks = [t for t in (1, 1.5, 2, 3, 4, 5, 6, 8) if np.nanmin(x) * 0.9 <= t <= np.nanmax(x) * 1.1] or [1]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("MACs speedup vs. uncached (×, log scale, higher is better)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _label_frontier(ax, x: np.ndarray, y: np.ndarray, names: np.ndarray, base: np.ndarray) -> None:
    """The short name of each globally Pareto-optimal cached row (one label per distinct point), alternately below
    and above it so neighbours on a flat stretch of the frontier do not overprint."""
    optimal = np.flatnonzero(pareto_mask(np.column_stack([x, y]), [True, False]) & ~base)
    seen = set()
    for i in optimal[np.argsort(x[optimal], kind="stable")]:
        if (x[i], y[i]) in seen:
            continue
        seen.add((x[i], y[i]))
        ax.annotate(names[i], (x[i], y[i]), xytext=(6, -11 if len(seen) % 2 else 7), textcoords="offset points",
                    fontsize=6.5, alpha=0.85, zorder=7)


def plot_pareto(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One column per setting: ΔFID (mean ± paired std; raw FID where no baseline FID) against MACs speedup,
    families by colour and marker, learned families in bold, the globally Pareto-optimal rows labelled with their
    short names; a second row with ΔKID / KID when KID was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(table.groupby(SETTING, dropna=False, sort=False))
    metrics = ["fid"] + (["kid"] if np.isfinite(table["kid_mean"].to_numpy(dtype=float)).any() else [])
    styles = _family_styles(sorted(set(table["family"].astype(str)) - {PLAIN}))
    fig = Figure(figsize=(7.0 * len(settings) + 2.8, 5.0 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), len(settings), squeeze=False, sharex="col")
    handles: dict = {}
    for col, (key, group) in enumerate(settings):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            _panel(ax, group, metric, styles, handles)
            ax.tick_params(labelbottom=True)  # shared x per setting, but every panel keeps its tick labels
            ax.set_title(_setting_title(key) + (f" · {metric.upper()}" if len(metrics) > 1 else ""), fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", fontsize=8,
                   title="family (filled, bold: learned)", title_fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def write_leaderboard(df: pd.DataFrame, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv`` and ``pareto.png`` into ``out_dir`` (staged in a
    sibling folder and moved in only when all three exist). ``df`` is a ``leaderboard()`` table or the raw
    ``collect_rows()`` rows. A non-empty ``out_dir`` is refused (FileExistsError) unless ``overwrite``."""
    from cqpolicy.outputs import OutputDir

    table = df if "fid_mean" in df.columns else leaderboard(df)
    names = {"markdown": "leaderboard.md", "csv": "leaderboard.csv", "plot": "pareto.png"}
    with OutputDir(out_dir, overwrite=overwrite) as out:
        out.file(names["markdown"]).write_text(markdown(table), encoding="utf-8")
        table.to_csv(out.file(names["csv"]), index=False)
        plot_pareto(table, out.file(names["plot"]))
        final = out.commit()
    return {kind: final / name for kind, name in names.items()}
