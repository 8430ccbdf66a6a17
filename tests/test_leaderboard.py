"""The MLflow leaderboard: Pareto masks, grouping over seeds, ΔFID against the same-seed baseline, files."""
import math

import numpy as np
import pandas as pd
import pytest

from cqpolicy.tracking.leaderboard import collect_rows, leaderboard, pareto_mask, write_leaderboard


# ------------------------------------------------------------------------------------------- pareto_mask
def test_pareto_mask_maximize_and_minimize():
    pts = np.array([
        [1.0, 10.0],  # 0 baseline: slowest, best FID -> optimal
        [2.0, 12.0],  # 1 optimal
        [2.0, 13.0],  # 2 dominated by 1 (same speedup, worse FID)
        [3.0, 15.0],  # 3 optimal
        [3.0, 15.0],  # 4 duplicate of an optimal point -> optimal too
        [1.5, 14.0],  # 5 dominated by 1
        [np.nan, 1.0],  # 6 NaN -> never optimal
        [9.0, np.nan],  # 7 NaN -> never optimal, and dominates nothing
    ])
    assert pareto_mask(pts, [True, False]).tolist() == [True, True, False, True, True, False, False, False]
    # both minimized: only the smallest-x/smallest-y corner survives
    assert pareto_mask(pts, [False, False]).tolist() == [True, False, False, False, False, False, False, False]
    # both maximized: (3, 15) twice
    assert pareto_mask(pts, [True, True]).tolist() == [False, False, False, True, True, False, False, False]
    # a tie in one objective, better in the other -> the tie-breaker wins; three objectives
    three = np.array([[1, 1, 1], [1, 1, 2], [2, 0, 0], [0, 0, 0]], dtype=float)
    assert pareto_mask(three, [True, True, True]).tolist() == [False, True, True, False]
    assert pareto_mask(np.zeros((0, 2)), [True, False]).tolist() == []
    with pytest.raises(ValueError):
        pareto_mask(pts, [True])


# ------------------------------------------------------------------------------------- MLflow end to end
@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, module_mlflow_db):
    """Overrides conftest's per-test store with the module's: the logged runs below are shared."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
    monkeypatch.chdir(tmp_path)


FAST = "teacache:threshold=0.3"
SLOW = "fora:interval=2"
# (method, seed, fid, macs_speedup, psnr); the baseline's PSNR is inf (not loggable), bit_identical=1
ROWS = [
    ("baseline", 0, 10.0, 1.0, None),
    ("baseline", 1, 12.0, 1.0, None),
    (SLOW, 0, 10.5, 1.8, 35.0),
    (SLOW, 1, 12.5, 1.8, 33.0),
    (FAST, 0, 14.0, 2.5, 25.0),
    (FAST, 1, 18.0, 2.5, 27.0),
    ("dominated:x=1", 0, 16.0, 1.5, 20.0),  # one seed, slower and worse than SLOW
]


@pytest.fixture(scope="module")
def logged(module_mlflow_db):
    import mlflow

    from cqpolicy.tracking import start_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
        ids = {}
        for method, seed, fid, speedup, psnr in ROWS:
            with start_run("cqpolicy-bench", run_name=f"bench-{method}") as run:
                mlflow.log_params({"model": "fmnist-dit", "policy": method.split(":")[0], "policy_config": method,
                                   "cache_dtype": "fp16", "steps": 20, "num_samples": 64, "seed": seed,
                                   "batch_size": 64, "guidance_scale": 1.0, "scheduler": "ddim", "repeats": 0})
                metrics = {"fid": fid, "macs_speedup": speedup, "ssim_vs_baseline": 1.0 if psnr is None else 0.9,
                           "bit_identical": float(psnr is None), "cache_bytes": 0 if psnr is None else 2**21,
                           "reuse_ratio": 0.0 if psnr is None else 0.5}
                if psnr is not None:
                    metrics["psnr_vs_baseline"] = psnr
                mlflow.log_metrics(metrics)
                ids[(method, seed)] = run.info.run_id
                if method == FAST and seed == 0:
                    mlflow.set_tag("cqpolicy_bench_id", "abc123")  # how a pipeline marks the runs of one bench
        # a search trial: the full spec in "policy", no policy_config; another setting (steps 10)
        with start_run("cqpolicy-search-demo", run_name="trial-0") as run:
            mlflow.log_params({"model": "fmnist-dit", "policy": FAST, "steps": 10, "num_samples": 64, "seed": 0})
            mlflow.log_metrics({"fid": 20.0, "macs_speedup": 2.0})
            ids[("search", 0)] = run.info.run_id
        # not ours (default selection skips it) and an empty experiment
        with start_run("cqpolicy-sample", run_name="sample"):
            mlflow.log_params({"policy": "none", "policy_config": "none"})
        mlflow.create_experiment("cqpolicy-bench-empty")
    return ids


def test_collect_rows_reads_bench_and_search_runs(logged):
    rows = collect_rows()
    assert len(rows) == len(ROWS) + 1 and set(rows["experiment"]) == {"cqpolicy-bench", "cqpolicy-search-demo"}
    search = rows[rows["experiment"] == "cqpolicy-search-demo"].iloc[0]
    assert search["method"] == FAST and search["family"] == "teacache" and search["steps"] == 10
    assert math.isnan(search["psnr_vs_baseline"]) and pd.isna(search["cache_dtype"])
    base = rows[(rows["method"] == "baseline") & (rows["seed"] == 1)].iloc[0]
    assert base["psnr_vs_baseline"] == math.inf and base["fid"] == 12.0
    assert len(collect_rows(["cqpolicy-bench"])) == len(ROWS)
    tagged = collect_rows(["cqpolicy-bench"], tags={"cqpolicy_bench_id": "abc123"})
    assert len(tagged) == 1 and tagged.iloc[0]["run_id"] == logged[(FAST, 0)]


def test_leaderboard_and_files(logged, tmp_path):
    table = leaderboard(collect_rows())
    main = table[table["steps"] == 10]
    assert len(main) == 1 and bool(main.iloc[0]["pareto"])  # alone in its setting
    table = table[table["steps"] == 20].set_index("method")
    assert list(table.index) == [FAST, SLOW, "baseline", "dominated:x=1"]  # Pareto first, then speedup ↓

    slow, fast, base, dom = table.loc[SLOW], table.loc[FAST], table.loc["baseline"], table.loc["dominated:x=1"]
    assert slow["fid_mean"] == pytest.approx(11.5) and slow["fid_std"] == pytest.approx(math.sqrt(2))
    assert fast["fid_mean"] == pytest.approx(16.0) and fast["fid_std"] == pytest.approx(math.sqrt(8))
    assert dom["fid_std"] == 0.0 and dom["n_seeds"] == 1 and slow["n_seeds"] == 2
    assert slow["delta_fid"] == pytest.approx(0.5) and fast["delta_fid"] == pytest.approx(5.0)
    assert dom["delta_fid"] == pytest.approx(6.0) and base["delta_fid"] == 0.0
    assert table["pareto"].to_dict() == {FAST: True, SLOW: True, "baseline": True, "dominated:x=1": False}
    assert base["psnr_vs_baseline"] == math.inf and slow["psnr_vs_baseline"] == pytest.approx(34.0)
    assert base["cache_dtype"] == "none" and slow["cache_dtype"] == "fp16"
    assert sorted(slow["run_ids"].split(",")) == sorted([logged[(SLOW, 0)], logged[(SLOW, 1)]])

    out = tmp_path / "board"
    paths = write_leaderboard(leaderboard(collect_rows()), out)
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.csv", "leaderboard.md", "pareto.png"]
    assert set(paths) == {"markdown", "csv", "plot"} and all(p.parent == out for p in paths.values())
    md = paths["markdown"].read_text()
    assert f"`{SLOW}`" in md and "11.50 ± 1.41 (2)" in md and "+5.00" in md and "✓" in md
    assert logged[(SLOW, 0)][:8] in md and logged[(SLOW, 0)] not in md and "∞" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000
    assert len(pd.read_csv(paths["csv"])) == 5

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        write_leaderboard(collect_rows(["cqpolicy-bench"]), out)  # raw rows are accepted too
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    paths = write_leaderboard(collect_rows(["cqpolicy-bench"]), out, overwrite=True)
    assert len(pd.read_csv(paths["csv"])) == 4


def test_unknown_or_empty_experiment_is_a_value_error(logged):
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'.*known: .*cqpolicy-bench") as err:
        collect_rows(["nope"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"no bench or search runs in MLflow at .*run `cqpolicy bench` first"):
        collect_rows(["cqpolicy-bench-empty"])
