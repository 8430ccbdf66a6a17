"""The MLflow leaderboard: Pareto masks, grouping over seeds, ΔFID / ΔKID against the same-seed baseline with
their paired stds, the "families are frontiers" verdict (protocol v2: per-replicate interpolated frontiers, 2 SE),
short names, old-run fallbacks, files."""
import math

import numpy as np
import pandas as pd
import pytest

from cqpolicy.tracking.leaderboard import (COLUMNS, collect_rows, leaderboard, markdown, pareto_mask,
                                           write_leaderboard)
from cqpolicy.tracking.names import short_name


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


# ------------------------------------------------------------------- the verdict, on hand-made rows
def _rows(spec):
    """{(method, family, macs): {seed: (fid, kid)}} -> collect_rows()-like rows of one setting."""
    out = []
    for (method, family, macs), seeds in spec.items():
        for seed, (fid, kid) in seeds.items():
            out.append({"method": method, "family": family, "model": "m", "steps": 10, "num_samples": 64,
                        "cache_dtype": "fp16", "seed": seed, "fid": fid, "kid": kid, "macs_speedup": macs})
    return pd.DataFrame(out)


LEARNED = "learned:path=a.pt"
CASE = {
    ("baseline", "plain", 1.0): {0: (10.0, 0.01), 1: (11.0, 0.02), 2: (12.0, 0.03)},
    # deltas 0.5, 0.6, 0.4 -> 0.5 ± 0.1; KID deltas 0.01, 0.01, 0.02
    (LEARNED, "learned-mlp", 2.0): {0: (10.5, 0.02), 1: (11.6, 0.03), 2: (12.4, 0.05)},
    # fora: the slower setting is better but below the learned row's MACs, so it does not count;
    # at 2.5: deltas 3.0, 3.2, 2.8; learned minus it: -2.5, -2.6, -2.4 (std 0.1) -> beaten by 2.5 > 0.1
    ("fora:interval=2", "fora", 1.8): {0: (10.1, 0.01), 1: (11.1, 0.02), 2: (12.1, 0.03)},
    ("fora:interval=3", "fora", 2.5): {0: (13.0, 0.04), 1: (14.2, 0.05), 2: (14.8, 0.06)},
    # teacache's best at >= 2.0 is the 2.2 row (delta 0.6; the 3.0 row is worse); learned minus it:
    # -0.2, 0.3, -0.4 (std sqrt(0.13) = 0.36) -> 0.1 better, inside the paired std: a tie
    ("teacache:threshold=0.1", "teacache", 2.2): {0: (10.7, 0.02), 1: (11.3, 0.02), 2: (12.8, 0.03)},
    ("teacache:threshold=0.5", "teacache", 3.0): {0: (15.0, 0.05), 1: (16.0, 0.06), 2: (17.0, 0.07)},
    # smoothcache only exists below 2.0: unopposed there
    ("smoothcache:alpha=0.1", "smoothcache", 1.5): {0: (10.2, 0.01), 1: (11.2, 0.02), 2: (12.2, 0.03)},
    # dps is much worse but shares one seed only: no paired std, not beaten
    ("dps:k=4", "dps", 2.1): {0: (14.0, 0.05)},
    # another learned family: far worse, 3 seeds -> beaten
    ("learned:path=iv.json", "learned-intervals", 4.0): {0: (20.0, 0.1), 1: (21.5, 0.1), 2: (21.5, 0.1)},
}


def test_kid_and_paired_delta_columns_on_hand_computed_numbers():
    table = leaderboard(_rows(CASE)).set_index("method")
    lr, base = table.loc[LEARNED], table.loc["baseline"]
    assert lr["family"] == "learned-mlp" and base["family"] == "plain" and base["cache_dtype"] == "none"
    assert lr["seeds"] == "0 1 2" and table.loc["dps:k=4", "seeds"] == "0"
    assert lr["fid_mean"] == pytest.approx(34.5 / 3) and lr["delta_fid"] == pytest.approx(0.5)
    assert lr["delta_fid_std"] == pytest.approx(0.1)  # std of 0.5, 0.6, 0.4
    # KID 0.02, 0.03, 0.05: mean 1/30, deviations -4, -1, 5 (/300) -> std sqrt(42 / 2) / 300
    assert lr["kid_mean"] == pytest.approx(0.1 / 3) and lr["kid_std"] == pytest.approx(math.sqrt(21) / 300)
    # KID deltas 0.01, 0.01, 0.02: mean 0.04/3, deviations -1, -1, 2 (/300) -> std sqrt(6 / 2) / 300
    assert lr["delta_kid"] == pytest.approx(0.04 / 3) and lr["delta_kid_std"] == pytest.approx(math.sqrt(3) / 300)
    assert base["delta_fid"] == 0.0 and base["delta_fid_std"] == 0.0 and base["delta_kid"] == 0.0
    assert base["kid_std"] == pytest.approx(0.01) and base["fid_std"] == pytest.approx(1.0)
    dps = table.loc["dps:k=4"]  # one seed: spread 0 (as fid_std always was), no paired std
    assert dps["delta_fid"] == pytest.approx(4.0) and math.isnan(dps["delta_fid_std"]) and dps["kid_std"] == 0.0
    assert math.isnan(dps["delta_kid_std"]) and dps["delta_kid"] == pytest.approx(0.04)
    assert set(COLUMNS) <= set(table.reset_index().columns)


def test_families_are_frontiers_verdict():
    table = leaderboard(_rows(CASE)).set_index("method")
    lr = table.loc[LEARNED]
    # fora's frontier at 2.0x lies between its 1.8x and 2.5x rows (learned below it by ~0.53, SE ~0.02);
    # teacache's between plain (1x) and its 2.2x row: mean d -0.03, inside 2 SE; dps shares one seed: a tie;
    # learned-intervals' between plain and its 4x row (15, 16.25, 16.75): beaten; smoothcache stops at 1.5x
    assert (lr["beats"], lr["ties"], lr["loses_to"], lr["unopposed"]) == (
        "fora,learned-intervals", "dps,teacache", "", "smoothcache")
    assert not lr["beats_all"]
    vs = {v.split(":")[0]: v.split(":")[1:] for v in lr["vs_frontiers"].split(";")}
    assert sorted(vs) == ["dps", "fora", "learned-intervals", "teacache"]  # the opposed families only
    assert vs["dps"][2] == "1" and vs["dps"][1] == "nan"  # one shared seed: no SE
    assert float(vs["learned-intervals"][0]) == pytest.approx(-4.5) and vs["learned-intervals"][2] == "3"
    # the fastest row: every other family unopposed -> no verdict to give, never beats all
    iv = table.loc["learned:path=iv.json"]
    assert iv["unopposed"] == "dps,fora,learned-mlp,smoothcache,teacache" and iv["beats"] == "" and iv["ties"] == ""
    assert not iv["beats_all"] and iv["vs_frontiers"] == ""
    # the plain model gets no verdict
    base = table.loc["baseline"]
    assert not base["beats_all"] and base["unopposed"] == "" and base["beats"] == "" and base["vs_frontiers"] == ""
    # without the tie (teacache) and the one-seed family (dps): beats all, smoothcache still listed
    rest = {k: v for k, v in CASE.items() if k[1] not in ("teacache", "dps")}
    lr = leaderboard(_rows(rest)).set_index("method").loc[LEARNED]
    assert lr["beats_all"] and lr["beats"] == "fora,learned-intervals" and lr["unopposed"] == "smoothcache"

    md = markdown(leaderboard(_rows(CASE)))
    assert "| unopposed | unopposed dps, fora, learned-mlp, smoothcache, teacache |" in md  # the fastest row
    assert "| beats fora, learned-intervals; ties dps, teacache; unopposed smoothcache |" in md
    assert "| 0.0333 ± 0.0153 | +0.0133 ± 0.0058 |" in md  # KID: 4 digits of the setting's largest (0.1)
    assert "+0.50 ± 0.10" in md and "log(MACs speedup)" in md and "2 SE" in md


# one family, fora, at 2x (+2 FID per seed) and 4x (+4); the plain model at 1x anchors its frontier
BASE = {0: (10.0, 0.01), 1: (11.0, 0.02), 2: (12.0, 0.03)}
FORA = {("baseline", "plain", 1.0): BASE,
        ("fora:interval=2", "fora", 2.0): {k: (v[0] + 2.0, v[1]) for k, v in BASE.items()},
        ("fora:interval=4", "fora", 4.0): {k: (v[0] + 4.0, v[1]) for k, v in BASE.items()}}


def _verdict_of(rows: dict, method: str) -> pd.Series:
    return leaderboard(_rows({**FORA, **rows})).set_index("method").loc[method]


def near(value):
    """vs_frontiers holds 4 decimals."""
    return pytest.approx(value, abs=1e-4)


def _vs(row: pd.Series, family: str) -> tuple[float, float, int]:
    entry = next(v for v in row["vs_frontiers"].split(";") if v.split(":")[0] == family)
    _, mean, se, n = entry.split(":")
    return float(mean), float(se), int(n)


def test_frontier_is_interpolated_in_log_macs():
    # at 3x, fora's frontier is 12 + 2 t per seed (+ the seed's offset) with t = log(3 / 2) / log(4 / 2) = 0.585,
    # not t = 0.5 (linear in MACs, where this row would tie at 0.00)
    t = math.log(1.5) / math.log(2.0)
    row = _verdict_of({(LEARNED, "learned-mlp", 3.0): {0: (12.9, 0.0), 1: (14.0, 0.0), 2: (15.1, 0.0)}}, LEARNED)
    mean, se, n = _vs(row, "fora")
    assert mean == near(14.0 - (13.0 + 2 * t)) and mean == near(-0.1699)
    assert se == near(0.1 / math.sqrt(3)) and n == 3  # d: mean -0.17 ± 0.1 per seed
    assert row["beats"] == "fora" and row["beats_all"]
    # the interpolation uses only the seeds both points around the row have: fora's 4x row lost seed 2
    partial = dict(FORA)
    partial[("fora:interval=4", "fora", 4.0)] = {k: (v[0] + 4.0, v[1]) for k, v in BASE.items() if k != 2}
    row = leaderboard(_rows({**partial, (LEARNED, "learned-mlp", 3.0): {0: (12.9, 0.0), 1: (14.0, 0.0),
                                                                          2: (15.1, 0.0)}})).set_index("method")
    mean, se, n = _vs(row.loc[LEARNED], "fora")
    assert n == 2 and mean == near(13.45 - (12.5 + 2 * t))


def test_the_plain_model_anchors_rows_slower_than_a_family():
    t = math.log(1.5) / math.log(2.0)  # 1.5x: between plain (1x) and fora's 2x row
    rows = {(LEARNED, "learned-mlp", 1.5): {k: (v[0] + 2 * t + 0.3, 0.0) for k, v in BASE.items()},
            # slower than plain (overhead): compared with plain itself, clamped at 1x
            ("learned:path=slow.pt", "learned-slow", 0.9): {0: (9.8, 0.0), 1: (10.7, 0.0), 2: (11.9, 0.0)}}
    table = leaderboard(_rows({**FORA, **rows})).set_index("method")
    mean, se, n = _vs(table.loc[LEARNED], "fora")
    assert mean == near(0.3) and se == near(0.0) and n == 3
    # learned-slow's 0.9x row is below 1x, so its frontier is the plain model alone: unopposed at 1.5x
    assert table.loc[LEARNED, "loses_to"] == "fora" and table.loc[LEARNED, "unopposed"] == "learned-slow"
    slow = table.loc["learned:path=slow.pt"]
    mean, se, n = _vs(slow, "fora")  # d: -0.2, -0.3, -0.1 against plain
    assert mean == near(-0.2) and se == near(0.1 / math.sqrt(3)) and n == 3
    assert slow["beats"] == "fora,learned-mlp" and slow["ties"] == "" and slow["unopposed"] == ""
    assert _vs(slow, "learned-mlp") == near((-0.2, 0.1 / math.sqrt(3), 3))  # the same plain anchor


def test_two_standard_errors_decide_beats_ties_and_losses():
    # against fora's 2x row (12, 13, 14): d = -0.3, -0.1, 0.1 / -0.3, -0.2, -0.1 / 0.5, 0.6, 0.4 / -0.5 each
    rows = {("learned:path=tie.pt", "learned-a", 2.0): {0: (11.7, 0.0), 1: (12.9, 0.0), 2: (14.1, 0.0)},
            ("learned:path=win.pt", "learned-b", 2.0): {0: (11.7, 0.0), 1: (12.8, 0.0), 2: (13.9, 0.0)},
            ("learned:path=loss.pt", "learned-c", 2.0): {0: (12.5, 0.0), 1: (13.6, 0.0), 2: (14.4, 0.0)},
            ("learned:path=flat.pt", "learned-d", 2.0): {0: (11.5, 0.0), 1: (12.5, 0.0), 2: (13.5, 0.0)}}
    table = leaderboard(_rows({**FORA, **rows})).set_index("method")
    tie, win, loss, flat = (table.loc[f"learned:path={n}.pt"] for n in ("tie", "win", "loss", "flat"))
    assert _vs(tie, "fora") == near((-0.1, 0.2 / math.sqrt(3), 3))  # |mean| < 2 SE = 0.23
    assert "fora" in tie["ties"].split(",") and not tie["beats_all"]
    assert _vs(win, "fora") == near((-0.2, 0.1 / math.sqrt(3), 3))  # 0.2 > 2 SE = 0.115
    assert "fora" in win["beats"].split(",")
    assert _vs(loss, "fora") == near((0.5, 0.1 / math.sqrt(3), 3)) and "fora" in loss["loses_to"].split(",")
    assert _vs(flat, "fora")[1] == near(0.0) and "fora" in flat["beats"].split(",")  # SE 0: sign
    assert flat["beats"] == "fora,learned-a,learned-b,learned-c" and flat["beats_all"]
    md = markdown(table.reset_index())
    assert "| `learned:path=flat.pt` | learned-d |" in md
    assert "| ★ | beats fora, learned-a, learned-b, learned-c |" in md


def test_faster_than_a_family_is_unopposed_and_never_counted():
    rows = {(LEARNED, "learned-mlp", 5.0): {0: (15.0, 0.0), 1: (16.0, 0.0), 2: (17.0, 0.0)},
            ("teacache:threshold=0.9", "teacache", 6.0): {0: (20.0, 0.0), 1: (21.0, 0.0), 2: (22.0, 0.0)}}
    table = leaderboard(_rows({**FORA, **rows})).set_index("method")
    row = table.loc[LEARNED]  # fora stops at 4x; teacache's frontier at 5x: 10 + 10 log 5 / log 6 (+ seed)
    assert row["unopposed"] == "fora" and row["beats"] == "teacache" and row["beats_all"]
    assert _vs(row, "teacache")[0] == near(16.0 - (11.0 + 10 * math.log(5) / math.log(6)))
    assert "fora" not in row["vs_frontiers"]
    # without teacache, nothing is opposed: no star, "unopposed"
    alone = leaderboard(_rows({**FORA, (LEARNED, "learned-mlp", 5.0): rows[(LEARNED, "learned-mlp", 5.0)]}))
    row = alone.set_index("method").loc[LEARNED]
    assert row["unopposed"] == "fora" and not row["beats_all"] and row["beats"] == "" and row["vs_frontiers"] == ""
    assert "| unopposed | unopposed fora |" in markdown(alone)


def test_rows_without_macs_or_fid_get_no_verdict():
    rows = _rows({**FORA, (LEARNED, "learned-mlp", 2.0): {0: (11.0, 0.0), 1: (12.0, 0.0), 2: (13.0, 0.0)},
                  ("learned:path=nofid.pt", "learned-nofid", 3.0): {0: (math.nan, 0.0), 1: (math.nan, 0.0)}})
    rows.loc[rows["method"] == LEARNED, "macs_speedup"] = math.nan
    table = leaderboard(rows).set_index("method")
    lr, nofid = table.loc[LEARNED], table.loc["learned:path=nofid.pt"]
    assert lr["ties"] == "fora,learned-nofid" and lr["unopposed"] == "" and lr["beats"] == "" and not lr["beats_all"]
    assert lr["vs_frontiers"] == "fora:nan:nan:0;learned-nofid:nan:nan:0"
    # no FID: fora is opposed at 3x but there is nothing to compare; learned-mlp (no MACs) has no frontier point
    assert nofid["ties"] == "fora" and nofid["unopposed"] == "learned-mlp" and not nofid["beats_all"]
    assert _vs(nofid, "fora")[2] == 0
    # a NaN-MACs row is on no frontier: the fora rows see learned-mlp's frontier as the plain model alone
    assert table.loc["fora:interval=2", "unopposed"] == "learned-mlp,learned-nofid"


def test_name_column_is_the_short_spec():
    long = "fora:interval=3,warmup=0,unit=attn1+ff,attn1_interval=0,ff_interval=0"
    rows = {("baseline", "plain", 1.0): BASE, (long, "fora", 2.85): {k: (v[0] + 1, v[1]) for k, v in BASE.items()},
            ("learned:path=/runs/deep/mlp.pt", "learned-mlp", 2.0): BASE}
    table = leaderboard(_rows(rows))
    names = dict(zip(table["method"], table["name"]))
    assert names == {m: short_name(m) for m in names}  # which options are defaults is the registry's business
    assert names["baseline"] == "plain model" and names["learned:path=/runs/deep/mlp.pt"] == "learned:path=mlp.pt"
    assert names[long].startswith("fora:interval=3") and "warmup=0" not in names[long]
    assert list(table.columns[:8]) == ["model", "steps", "num_samples", "method", "cache_dtype", "weights", "name",
                                       "family"]
    md = markdown(table)
    assert f"| `{names[long]}` | fora |" in md and long not in md and "| `learned:path=mlp.pt` |" in md


def test_weights_rows_group_apart_and_their_family_carries_the_weights():
    """(method, weights) rows: a quantized FORA is family fora+int8, judged against the fp FORA's frontier; rows
    that logged no weights (older runs of the same model) group with the fp ones."""
    base = {0: (10.0, 0.01), 1: (11.0, 0.02), 2: (12.0, 0.03)}
    rows = _rows({("baseline", "plain", 1.0): base, ("fora:interval=2", "fora", 2.0): base,
                  ("none", "none", 1.0): base})
    rows["fid"] += np.select([rows["method"] == "fora:interval=2", rows["method"] == "none"], [0.5, 0.1], 0.0)
    rows["weights"] = np.where(rows["method"] == "none", "int8", "fp")
    rows.loc[(rows["method"] == "baseline") & (rows["seed"] == 2), "weights"] = None  # an older run
    rows.loc[(rows["method"] == "fora:interval=2") & (rows["seed"] == 2), "weights"] = None
    quantized = rows[rows["method"] == "fora:interval=2"].assign(weights="int8")
    quantized["fid"] += quantized["seed"].map({0: 0.4, 1: 0.5, 2: 0.3})  # 0.4 ± 0.1 worse than fp fora
    rows = pd.concat([rows, quantized], ignore_index=True)
    rows["model_bytes"] = np.where(rows["weights"] == "int8", 1.1 * 2**20, 4 * 2**20)
    rows["compression_ratio"] = np.where(rows["weights"] == "int8", 3.64, 1.0)
    table = leaderboard(rows)
    assert len(table) == 4 and table["n_seeds"].tolist() == [3] * 4
    table = table.set_index(["method", "weights"])
    assert table["family"].to_dict() == {("baseline", "fp"): "plain", ("fora:interval=2", "fp"): "fora",
                                         ("fora:interval=2", "int8"): "fora+int8", ("none", "int8"): "none+int8"}
    joint, fp = table.loc[("fora:interval=2", "int8")], table.loc[("fora:interval=2", "fp")]
    assert joint["delta_fid"] == pytest.approx(0.9) and fp["delta_fid"] == pytest.approx(0.5)
    # fp fora's frontier at 2x is its row: int8 is 0.4 ± 0.1 / sqrt(3) above it; none+int8 stops at 1x
    assert joint["loses_to"] == "fora" and joint["unopposed"] == "none+int8" and joint["beats"] == ""
    assert joint["vs_frontiers"] == f"fora:0.4000:{0.1 / math.sqrt(3):.4f}:3"
    assert fp["beats_all"] and fp["beats"] == "fora+int8" and fp["unopposed"] == "none+int8"
    # int8 without a cache, at 1x: above the plain model by 0.1 on every seed, both cached families reach 1x
    assert table.loc[("none", "int8"), "loses_to"] == "fora,fora+int8"
    assert joint["model_bytes"] == 1.1 * 2**20 and joint["compression_ratio"] == 3.64
    md = markdown(table.reset_index())
    assert "| `fora:interval=2` | fora+int8 | fp16 | int8 | 2.00× |" in md
    assert "| 1.10 | 3.64× |" in md and "| 4.00 | 1.00× |" in md
    assert "| weights | MACs speedup |" in md and "| cache MiB | model MiB | compression | Pareto |" in md
    assert "**Weights**" in md and "**Weights**" not in markdown(leaderboard(_rows(CASE)))


# ------------------------------------------------------------------------------------- MLflow end to end
@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, module_mlflow_db):
    """Overrides conftest's per-test store with the module's: the logged runs below are shared."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
    monkeypatch.chdir(tmp_path)


FAST = "teacache:threshold=0.3"
SLOW = "fora:interval=2"
MLP = "learned:path=/runs/mlp.pt"
# (method, family, seed, fid, kid, macs_speedup, psnr, calibration_macs); the baseline's PSNR is inf (not
# loggable), bit_identical=1
ROWS = [
    ("baseline", "plain", 0, 10.0, 0.010, 1.0, None, 0.0),
    ("baseline", "plain", 1, 12.0, 0.030, 1.0, None, 0.0),
    (SLOW, "fora", 0, 10.5, 0.012, 1.8, 35.0, 0.0),
    (SLOW, "fora", 1, 12.5, 0.036, 1.8, 33.0, 0.0),
    (FAST, "teacache", 0, 14.0, 0.050, 2.5, 25.0, 5e8),
    (FAST, "teacache", 1, 18.0, 0.090, 2.5, 27.0, 7e8),
    ("dominated:x=1", "dominated", 0, 16.0, 0.070, 1.5, 20.0, 0.0),  # one seed, slower and worse than SLOW
    (MLP, "learned-mlp", 0, 11.0, 0.020, 2.0, 30.0, 0.0),
    (MLP, "learned-mlp", 1, 13.2, 0.035, 2.0, 29.0, 0.0),
]
OLD = "fora:interval=3"
# runs logged before the family param and the kid metric existed, in their own experiment and model
OLD_ROWS = [("baseline", 0, 10.0), ("baseline", 1, 11.0), (OLD, 0, 11.0), (OLD, 1, 13.0)]


@pytest.fixture(scope="module")
def logged(module_mlflow_db):
    import mlflow

    from cqpolicy.tracking import start_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
        ids = {}
        for method, family, seed, fid, kid, speedup, psnr, calibration in ROWS:
            with start_run("cqpolicy-bench", run_name=f"bench-{method}") as run:
                mlflow.log_params({"model": "fmnist-dit", "policy": method.split(":")[0], "policy_config": method,
                                   "family": family, "cache_dtype": "fp16", "steps": 20, "num_samples": 64,
                                   "seed": seed, "batch_size": 64, "guidance_scale": 1.0, "scheduler": "ddim",
                                   "repeats": 0})
                metrics = {"fid": fid, "kid": kid, "macs_speedup": speedup, "calibration_macs": calibration,
                           "ssim_vs_baseline": 1.0 if psnr is None else 0.9, "bit_identical": float(psnr is None),
                           "cache_bytes": 0 if psnr is None else 2**21, "reuse_ratio": 0.0 if psnr is None else 0.5}
                if psnr is not None:
                    metrics["psnr_vs_baseline"] = psnr
                mlflow.log_metrics(metrics)
                ids[(method, seed)] = run.info.run_id
                if method == FAST and seed == 0:
                    mlflow.set_tag("cqpolicy_bench_id", "abc123")  # how a pipeline marks the runs of one bench
        for method, seed, fid in OLD_ROWS:
            with start_run("cqpolicy-bench-old", run_name=f"bench-{method}"):
                mlflow.log_params({"model": "old-dit", "policy": method.split(":")[0], "policy_config": method,
                                   "cache_dtype": "fp16", "steps": 20, "num_samples": 64, "seed": seed})
                mlflow.log_metrics({"fid": fid, "macs_speedup": 1.0 if method == "baseline" else 2.9})
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
    assert len(rows) == len(ROWS) + len(OLD_ROWS) + 1
    assert set(rows["experiment"]) == {"cqpolicy-bench", "cqpolicy-bench-old", "cqpolicy-search-demo"}
    search = rows[rows["experiment"] == "cqpolicy-search-demo"].iloc[0]
    assert search["method"] == FAST and search["family"] == "teacache" and search["steps"] == 10
    assert math.isnan(search["psnr_vs_baseline"]) and pd.isna(search["cache_dtype"]) and math.isnan(search["kid"])
    base = rows[(rows["method"] == "baseline") & (rows["seed"] == 1) & (rows["model"] == "fmnist-dit")].iloc[0]
    assert base["psnr_vs_baseline"] == math.inf and base["fid"] == 12.0 and base["kid"] == 0.03
    assert base["family"] == "plain"
    mlp = rows[rows["method"] == MLP]
    assert set(mlp["family"]) == {"learned-mlp"}  # the logged family, not the spec's "learned"
    assert len(collect_rows(["cqpolicy-bench"])) == len(ROWS)
    tagged = collect_rows(["cqpolicy-bench"], tags={"cqpolicy_bench_id": "abc123"})
    assert len(tagged) == 1 and tagged.iloc[0]["run_id"] == logged[(FAST, 0)]
    assert tagged.iloc[0]["calibration_macs"] == 5e8


def test_old_runs_fall_back_to_derived_family_and_nan_kid(logged):
    rows = collect_rows(["cqpolicy-bench-old"])
    assert dict(zip(rows["method"], rows["family"])) == {"baseline": "plain", OLD: "fora"}
    assert rows["kid"].isna().all() and rows["calibration_macs"].isna().all()
    table = leaderboard(rows).set_index("method")
    old, base = table.loc[OLD], table.loc["baseline"]
    assert old["family"] == "fora" and base["family"] == "plain"
    assert old["delta_fid"] == pytest.approx(1.5) and old["delta_fid_std"] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(old["kid_mean"]) and math.isnan(old["kid_std"]) and math.isnan(old["delta_kid"])
    assert math.isnan(old["delta_kid_std"]) and old["seeds"] == "0 1"
    assert (old["beats"], old["ties"], old["loses_to"], old["unopposed"], old["vs_frontiers"]) == ("",) * 5
    assert not old["beats_all"]  # no other family
    # a table without a family column at all (e.g. hand-made rows) derives it the same way
    table = leaderboard(rows.drop(columns=["family", "kid"]))
    assert dict(zip(table["method"], table["family"])) == {"baseline": "plain", OLD: "fora"}
    md = markdown(table)
    assert "| – |" in md and "+1.50 ± 0.71" in md
    assert "| fora | fp16 | – | 2.90× |" in md  # no weights logged: shown as such, no model size either
    assert table["weights"].isna().all() and table["model_bytes"].isna().all()


def test_leaderboard_and_files(logged, tmp_path):
    table = leaderboard(collect_rows(["cqpolicy-bench", "cqpolicy-search-demo"]))
    main = table[table["steps"] == 10]
    assert len(main) == 1 and bool(main.iloc[0]["pareto"])  # alone in its setting
    table = table[table["steps"] == 20].set_index("method")
    assert list(table.index) == [FAST, MLP, SLOW, "baseline", "dominated:x=1"]  # Pareto first, then speedup ↓

    slow, fast, base, dom, mlp = (table.loc[m] for m in (SLOW, FAST, "baseline", "dominated:x=1", MLP))
    assert slow["fid_mean"] == pytest.approx(11.5) and slow["fid_std"] == pytest.approx(math.sqrt(2))
    assert fast["fid_mean"] == pytest.approx(16.0) and fast["fid_std"] == pytest.approx(math.sqrt(8))
    assert dom["fid_std"] == 0.0 and dom["n_seeds"] == 1 and slow["n_seeds"] == 2
    assert slow["delta_fid"] == pytest.approx(0.5) and fast["delta_fid"] == pytest.approx(5.0)
    assert dom["delta_fid"] == pytest.approx(6.0) and base["delta_fid"] == 0.0
    # paired deltas: slow 0.5, 0.5 -> std 0; fast 4, 6 -> sqrt(2); mlp 1.0, 1.2 -> 0.1 * sqrt(2)
    assert slow["delta_fid_std"] == pytest.approx(0.0) and fast["delta_fid_std"] == pytest.approx(math.sqrt(2))
    assert mlp["delta_fid"] == pytest.approx(1.1) and mlp["delta_fid_std"] == pytest.approx(0.1 * math.sqrt(2))
    # KID: slow 0.012, 0.036 vs 0.010, 0.030 -> mean 0.024 ± 0.024/sqrt2, deltas 0.002, 0.006
    assert slow["kid_mean"] == pytest.approx(0.024) and slow["kid_std"] == pytest.approx(0.024 / math.sqrt(2))
    assert slow["delta_kid"] == pytest.approx(0.004) and slow["delta_kid_std"] == pytest.approx(0.004 / math.sqrt(2))
    assert fast["calibration_macs"] == pytest.approx(6e8) and slow["calibration_macs"] == 0.0
    assert table["family"].to_dict() == {FAST: "teacache", MLP: "learned-mlp", SLOW: "fora", "baseline": "plain",
                                         "dominated:x=1": "dominated"}
    assert table["pareto"].to_dict() == {FAST: True, MLP: True, SLOW: True, "baseline": True, "dominated:x=1": False}
    # verdicts: teacache's frontier at 2x (plain to its 2.5x row) is 13.03, 16.54: mlp below by 2.68 ± 0.66 (SE);
    # fora (1.8x) and dominated (1.5x) stop below 2x
    assert mlp["beats_all"] and mlp["beats"] == "teacache" and mlp["unopposed"] == "dominated,fora"
    t = math.log(2) / math.log(2.5)
    d = [11.0 - (10.0 + 4 * t), 13.2 - (12.0 + 6 * t)]
    assert mlp["vs_frontiers"] == f"teacache:{np.mean(d):.4f}:{abs(d[0] - d[1]) / 2:.4f}:2"
    # dominated: one seed, so a tie with every family (all reach 1.5x)
    assert not dom["beats_all"] and dom["ties"] == "fora,learned-mlp,teacache" and dom["unopposed"] == ""
    assert base["psnr_vs_baseline"] == math.inf and slow["psnr_vs_baseline"] == pytest.approx(34.0)
    assert base["cache_dtype"] == "none" and slow["cache_dtype"] == "fp16" and slow["seeds"] == "0 1"
    assert sorted(slow["run_ids"].split(",")) == sorted([logged[(SLOW, 0)], logged[(SLOW, 1)]])

    out = tmp_path / "board"
    paths = write_leaderboard(leaderboard(collect_rows()), out)
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.csv", "leaderboard.md", "pareto.png"]
    assert set(paths) == {"markdown", "csv", "plot"} and all(p.parent == out for p in paths.values())
    md = paths["markdown"].read_text()
    assert f"`{SLOW}`" in md and "11.50 ± 1.41 (2)" in md and "+5.00 ± 1.41" in md and "✓" in md and "★" in md
    assert "0.02400 ± 0.01697" in md and "+0.00400 ± 0.00283" in md and "learned-mlp" in md
    assert logged[(SLOW, 0)][:8] in md and logged[(SLOW, 0)] not in md and "∞" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000
    csv = pd.read_csv(paths["csv"])
    assert len(csv) == 5 + 1 + 2  # this setting, the search trial, the old runs
    required = ["method", "family", "cache_dtype", "macs_speedup", "wall_speedup", "fid_mean", "fid_std", "delta_fid",
                "delta_fid_std", "kid_mean", "kid_std", "num_samples", "seeds"]
    assert set(required + ["delta_kid", "delta_kid_std", "calibration_macs", "beats_all", "beats", "ties",
                           "loses_to", "unopposed", "vs_frontiers", "name", "pareto"]) <= set(csv.columns)
    assert "not_beaten_by_margin" not in csv.columns
    assert csv.set_index("method").loc[SLOW, "seeds"] == "0 1"

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        write_leaderboard(collect_rows(["cqpolicy-bench"]), out)  # raw rows are accepted too
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    paths = write_leaderboard(collect_rows(["cqpolicy-bench"]), out, overwrite=True)
    assert len(pd.read_csv(paths["csv"])) == 5


def test_unknown_or_empty_experiment_is_a_value_error(logged):
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'.*known: .*cqpolicy-bench") as err:
        collect_rows(["nope"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"no bench or search runs in MLflow at .*run `cqpolicy bench` first"):
        collect_rows(["cqpolicy-bench-empty"])
