"""`cqpolicy run --quick` end to end on a tiny model: every stage, resume, report files."""
import json

import yaml

from cqpolicy.cli import main
from cqpolicy.pipeline import _matched_interval


def test_run_quick_end_to_end_and_resume(tiny_dit_dir, tmp_path, capsys, request):
    from pathlib import Path

    shipped = yaml.safe_load((Path(request.config.rootpath) / "configs/fmnist-dit.yaml").read_text())
    shipped["model"] = str(tiny_dit_dir)
    shipped["quick"]["steps"] = 6
    shipped["quick"]["search"]["min_psnr"] = None
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(shipped))
    out = tmp_path / "out"
    assert main(["run", str(config), "--quick", "--out", str(out)]) == 0
    for stage in ("traces", "train", "retrain", "search", "bench", "report"):
        assert (out / stage / "done.json").is_file(), stage
    report = out / "report"
    for name in ("leaderboard/leaderboard.md", "leaderboard/leaderboard.csv", "leaderboard/pareto.png",
                 "learned-decisions.png", "grids.png"):
        assert (report / name).stat().st_size > 100, name
    board = (report / "leaderboard" / "leaderboard.md").read_text()
    assert "fora:interval=2" in board and "learned:path=" in board and "baseline" in board
    rows = json.loads((out / "bench" / "rows.json").read_text())
    assert {r["seed"] for r in rows} == {0, 1_000_000}
    # the samples each role saw: traces, retrain traces, study trials and bench rows never share one
    from cqpolicy.tracing.store import TraceReader

    seen = {"trace": set(TraceReader([out / "traces" / "none"]).table()["seed"].to_pylist()),
            "retrain": set(TraceReader([out / "retrain" / "learned"]).table()["seed"].to_pylist()),
            "search": _study_seeds(), "test": {r["seed"] + i for r in rows for i in range(r["num_samples"])}}
    assert all(seen.values()), seen.keys()
    for a in seen:
        for b in seen:
            assert a == b or not seen[a] & seen[b], (a, b)
    assert all(r["macs_source"] in ("runtime counts", "plain model") for r in rows)
    # every benched learned point has FORA at its MACs and cache format next to it (unless that is plain sampling)
    learned = [(r["policy"], r["cache_dtype"], r["macs_speedup"]) for r in rows
               if r["policy"].startswith("learned:") and "threshold=" in r["policy"]]
    assert learned
    benched = {(r["policy"], r["cache_dtype"]) for r in rows}
    for _, dtype, macs in learned:
        k = _matched_interval(macs, 6)
        assert k == 1 or (f"fora:interval={k}", dtype) in benched
    assert json.loads((out / "retrain" / "done.json").read_text())["retrained"] is True
    for budget in ("0.2", "0.3"):  # the phase-locked interval schedules are fitted and benched
        assert json.loads((out / "train" / f"intervals-{budget}" / "policy.json").read_text())["fit"] == "intervals"
        assert any(f"intervals-{budget}" in r["policy"] for r in rows)
        assert (report / f"learned-intervals-{budget}.png").stat().st_size > 100
    # the gates are trained through the sampler on rollout seeds and benched at the config's budgets
    gates = json.loads((out / "train" / "gates" / "policy.json").read_text())
    assert gates["kind"] == "gates" and gates["training"]["rollout_seeds"][0] == 22_000_000
    assert any(r["policy"] == f"learned:path={out / 'train' / 'gates'},budget=0.5" for r in rows)
    # the forecast of FORA-3 is fitted on uncached calibration runs (never a test sample) and benched
    forecast = out / "train" / "forecast-fora-interval3"
    fit = json.loads((forecast / "policy.json").read_text())
    first, n = fit["training"]["calibration_seeds"]
    assert fit["kind"] == "forecast" and not set(range(first, first + n)) & seen["test"]
    assert any(r["policy"] == f"forecast:path={forecast}" for r in rows)
    capsys.readouterr()
    assert main(["run", str(config), "--quick", "--out", str(out)]) == 0  # resumes: every stage skipped
    printed = capsys.readouterr().out
    assert printed.count("done earlier: skipped") == 6


def _study_seeds() -> set:
    """Sample seeds of every search trial logged to MLflow (each trial samples seed .. seed + num_samples - 1)."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=["cqpolicy-search"], output_format="pandas")
    runs = runs[runs["params.trial"].notna()]
    assert len(runs)
    return {int(seed) + i for seed, n in zip(runs["params.seed"], runs["params.num_samples"]) for i in range(int(n))}


def test_run_refuses_seed_roles_that_meet(tmp_path, capsys):
    config = tmp_path / "overlap.yaml"
    config.write_text("model: fmnist-dit\nseeds: {search: 20000010}\n")  # inside the 32 traced samples
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "trace seeds" in err and "search seeds" in err and len(err.strip().splitlines()) == 1
    config.write_text("model: fmnist-dit\nseeds: {trace: 1000000}\n")  # test replicate 1
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "test seeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: fmnist-dit\nspeed: 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'speed'" in capsys.readouterr().err
    bad.write_bytes(b"model: \xff\xfe\n")  # not UTF-8: the one line names the file
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "not UTF-8" in err[0]


def test_matched_fora_interval_follows_the_share_of_computed_steps():
    # FORA-k computes ceil(50 / k) of 50 steps: 2 -> 25 (2x), 3 -> 17 (2.94x), 5 -> 10 (5x)
    assert _matched_interval(2.82, 50) == 3
    assert _matched_interval(4.62, 50) == 5
    assert _matched_interval(1.9, 50) == 2
    assert _matched_interval(1.16, 50) == 1
