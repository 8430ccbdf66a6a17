"""The leaderboard: every bench / search run in MLflow, grouped per method, with a Pareto front.

``collect_rows`` reads the finished runs (one row per run), ``leaderboard`` groups the runs of the same
(model, steps, num_samples, method, cache_dtype) over seeds (FID mean ± std, ΔFID against the baseline run
of the same seed, mean costs) and flags the (MACs speedup ↑, FID ↓) Pareto-optimal methods of each setting,
and ``write_leaderboard`` writes ``leaderboard.md``, ``leaderboard.csv`` and ``pareto.png`` into a folder
that is either complete or absent.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cqpolicy.tracking.mlflow_store import tracking_uri

BASELINE = "baseline"
DEFAULT_PREFIXES = ("cqpolicy-bench", "cqpolicy-search")
SETTING = ["model", "steps", "num_samples"]
GROUP = SETTING + ["method", "cache_dtype"]
NO_CACHE = "none"  # the baseline's cache_dtype in the leaderboard: it caches nothing
METRICS = ("macs_speedup", "wall_speedup", "fid", "psnr_vs_baseline", "ssim_vs_baseline", "reuse_ratio",
           "cache_bytes", "class_accuracy", "macs_per_image", "bit_identical")
MEANS = ("macs_speedup", "wall_speedup", "psnr_vs_baseline", "ssim_vs_baseline", "cache_bytes", "reuse_ratio",
         "class_accuracy", "macs_per_image", "bit_identical")


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
    ``cqpolicy-search*``) carrying all of ``tags``: experiment, run_id, method, family, cache_dtype, model,
    steps, num_samples, seed and the bench metrics (NaN where a run did not log one)."""
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
        "family": method.map(lambda m: m.split(":", 1)[0] if isinstance(m, str) else None),
        "cache_dtype": column("params.cache_dtype"),
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


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, steps, num_samples, method, cache_dtype): FID mean / std over seeds (std 0 for
    one seed) and n_seeds, ΔFID against the same-seed baseline, mean costs and fidelity, a ``pareto`` flag
    (MACs speedup ↑, FID mean ↓ within each model/steps/num_samples, baseline included at speedup 1), and
    the run ids. Sorted per setting: Pareto-optimal first, then MACs speedup descending."""
    if df is None or len(df) == 0:
        raise _no_runs_error(tracking_uri())
    work = df.copy()
    for name in METRICS + ("seed", "cache_dtype", "model", "steps", "num_samples"):
        if name not in work.columns:
            work[name] = np.nan
    if "family" not in work.columns:
        work["family"] = work["method"].map(lambda m: str(m).split(":", 1)[0])
    is_base = work["method"] == BASELINE
    work.loc[is_base, "cache_dtype"] = NO_CACHE
    work.loc[is_base, "macs_speedup"] = work.loc[is_base, "macs_speedup"].fillna(1.0)

    # the baseline FID of each (model, steps, num_samples, seed)
    base_fid = {}
    for key, group in work[is_base].groupby(SETTING + ["seed"], dropna=False):
        fid = group["fid"].mean()
        if not math.isnan(fid):
            base_fid[_key(key)] = fid

    records = []
    for key, group in work.groupby(GROUP, dropna=False, sort=False):
        per_seed = group.groupby("seed", dropna=False)["fid"].mean()  # repeated runs of a seed: their mean
        fids = per_seed.dropna()
        deltas = [fid - base_fid[_key(key[:3] + (seed,))] for seed, fid in fids.items()
                  if _key(key[:3] + (seed,)) in base_fid]
        record = dict(zip(GROUP, key))
        record.update({
            "family": group["family"].iloc[0],
            "n_runs": len(group),
            "n_seeds": int(per_seed.index.nunique(dropna=False)),
            "n_fid_seeds": len(fids),
            "fid_mean": float(fids.mean()) if len(fids) else math.nan,
            "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else (0.0 if len(fids) else math.nan),
            "delta_fid": float(np.mean(deltas)) if deltas else math.nan,
        })
        for name in MEANS:
            values = group[name].dropna()
            # np.mean keeps +inf (a bit-identical PSNR) as +inf
            record[name] = float(np.mean(values.to_numpy())) if len(values) else math.nan
        record["experiments"] = ",".join(sorted(set(group["experiment"].dropna()))) if "experiment" in group else ""
        record["run_ids"] = ",".join(group["run_id"]) if "run_id" in group else ""
        records.append(record)
    table = pd.DataFrame.from_records(records)
    table["pareto"] = False
    for _, group in table.groupby(SETTING, dropna=False, sort=False):
        mask = pareto_mask(group[["macs_speedup", "fid_mean"]].to_numpy(dtype=float), [True, False])
        table.loc[group.index, "pareto"] = mask
    columns = (GROUP + ["family", "n_runs", "n_seeds", "n_fid_seeds", "fid_mean", "fid_std", "delta_fid"]
               + list(MEANS) + ["pareto", "experiments", "run_ids"])
    table = table[columns].sort_values(SETTING + ["pareto", "macs_speedup", "fid_mean", "method"],
                                       ascending=[True, True, True, False, False, True, True], na_position="last",
                                       kind="stable")
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- files
def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return format(value, spec) + suffix


def _setting_title(key) -> str:
    model, steps, num_samples = ("?" if pd.isna(v) else v for v in key)
    return f"{model} · {steps} steps · {num_samples} samples"


def markdown(table: pd.DataFrame) -> str:
    """The leaderboard as markdown: one table per (model, steps, num_samples)."""
    header = ("| method | params | MACs speedup | wall speedup | FID ± std (n) | ΔFID | PSNR (dB) | cache MiB "
              "| Pareto | runs |")
    out = ["# cqpolicy leaderboard", ""]
    for key, group in table.groupby(SETTING, dropna=False, sort=False):
        out += [f"## {_setting_title(key)}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for r in group.itertuples(index=False):
            fid = ("–" if math.isnan(r.fid_mean)
                   else f"{r.fid_mean:.2f} ± {r.fid_std:.2f} ({r.n_fid_seeds})")
            cache = None if math.isnan(r.cache_bytes) else r.cache_bytes / 2**20
            runs = ", ".join(run[:8] for run in str(r.run_ids).split(",") if run)
            method = str(r.method).replace("|", "\\|")
            out.append(f"| `{method}` | {'–' if pd.isna(r.cache_dtype) else r.cache_dtype} | "
                       f"{_fmt(r.macs_speedup, '.2f', '×')} | {_fmt(r.wall_speedup, '.2f', '×')} | {fid} | "
                       f"{_fmt(r.delta_fid, '+.2f')} | {_fmt(r.psnr_vs_baseline, '.1f')} | {_fmt(cache, '.2f')} | "
                       f"{'✓' if r.pareto else ''} | {runs} |")
        out.append("")
    out.append("FID ± sample std over seeds (n = seeds with a FID); ΔFID = mean over seeds of FID minus the "
               "same-seed baseline's; Pareto = not dominated in (MACs speedup ↑, FID ↓) within the setting.")
    return "\n".join(out) + "\n"


def _frontier(xs: np.ndarray, ys: np.ndarray):
    """The Pareto-optimal points (x ↑, y ↓) sorted by x, for a step line."""
    points = np.column_stack([xs, ys])
    keep = pareto_mask(points, [True, False])
    order = np.argsort(xs[keep], kind="stable")
    return xs[keep][order], ys[keep][order]


def plot_pareto(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """FID mean (± std) against MACs speedup, one panel per setting, families by colour and marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(table.groupby(SETTING, dropna=False, sort=False))
    families = sorted(set(table["family"].astype(str)) - {BASELINE})
    colours = [f"C{i % 10}" for i in range(len(families))]
    markers = "osD^v<>phX*"
    style = {f: (colours[i], markers[i % len(markers)]) for i, f in enumerate(families)}
    fig = Figure(figsize=(7.5 * len(settings) + 2.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    handles = {}
    for ax, (key, group) in zip(axes, settings):
        x = group["macs_speedup"].to_numpy(dtype=float)
        y = group["fid_mean"].to_numpy(dtype=float)
        err = np.nan_to_num(group["fid_std"].to_numpy(dtype=float))
        fam = group["family"].astype(str).to_numpy()
        for f in families:
            sel = fam == f
            if not sel.any():
                continue
            colour, marker = style[f]
            h = ax.errorbar(x[sel], y[sel], yerr=err[sel], fmt=marker, color=colour, ms=6, capsize=3, alpha=0.85,
                            label=f)
            handles.setdefault(f, h)
            fx, fy = _frontier(x[sel], y[sel])
            if len(fx) > 1:
                ax.plot(fx, fy, drawstyle="steps-pre", color=colour, lw=1.2, alpha=0.7)
        gx, gy = _frontier(x, y)
        if len(gx):
            h = ax.plot(gx, gy, drawstyle="steps-pre", color="black", lw=2.2, ls="--", zorder=1.5,
                        label="global Pareto frontier")[0]
            handles.setdefault("global Pareto frontier", h)
            h = ax.scatter(gx, gy, s=160, facecolors="none", edgecolors="black", lw=1.8, zorder=5,
                           label="Pareto-optimal")
            handles.setdefault("Pareto-optimal", h)
        base = fam == BASELINE
        if base.any():
            h = ax.errorbar(x[base], y[base], yerr=err[base], fmt="*", color="crimson", ms=16, mec="black",
                            capsize=3, zorder=6, label="baseline (no cache)")
            handles.setdefault("baseline", h)
            ax.axvline(1.0, color="crimson", lw=0.8, ls=":", alpha=0.6)
        if not np.isfinite(y).any():
            ax.text(0.5, 0.5, "no FID logged (bench --fid)", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        ax.set_xlabel("MACs speedup vs. baseline (×, higher is better)")
        ax.set_ylabel("FID (mean ± std over seeds, lower is better)")
        ax.set_title(_setting_title(key), fontsize=10)
        ax.grid(True, alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", fontsize=8,
                   title="family")
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
