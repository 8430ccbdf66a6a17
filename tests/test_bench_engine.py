"""The bench engine (cqpolicy.evaluation.engine) on a tiny model: rows per (replicate, method), resume, the
leaderboard's columns, retime, weights entries, validation replicates, artifact seed records, wall timing under load,
bad configs."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cqpolicy.cli import main
from cqpolicy.evaluation import engine

REQUIRED = ["method", "family", "cache_dtype", "macs_speedup", "wall_speedup", "fid_mean", "fid_std", "delta_fid",
            "delta_fid_std", "kid_mean", "kid_std", "num_samples", "seeds", "wall_flag"]
TIMING = {"quality_pass_s", "wall_speedup", "wall_measured_on", "load_1m", "wall_flag"}  # the rest is deterministic


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, module_mlflow_db):
    """Every row logs an MLflow run: one store for the module (a fresh sqlite store costs seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
    monkeypatch.chdir(tmp_path)


def write_config(path: Path, model_dir, **values) -> Path:
    data = {"model": str(model_dir), "steps": 4, "batch_size": 4, "num_samples": 4,
            **({} if "replicates" in values else {"seeds": [0]}), "methods": ["fora:interval=2"], **values}
    path.write_text(yaml.safe_dump(data))
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*/*.json"))]


def one_line_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cqpolicy bench: error: ") and fragment in err, err
    return err


def test_config_bench_resumes_retimes_and_writes_the_table(tiny_dit_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "time_pair", lambda *args: (1.0, 0.5))  # a steady machine (real timing: below)
    schedule = tmp_path / "sched.json"  # a static schedule file: an artifact that records no seeds
    schedule.write_text(json.dumps({"attn1": [1, 0, 1, 1], "ff": [1, 0, 1, 1]}))
    config = write_config(tmp_path / "paper.yaml", tiny_dit_dir, seeds=[0, 1],
                          methods=["fora:interval=2", "teacache:threshold=0.3", f"schedule:path={schedule}"])
    out = tmp_path / "paper"
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 0
    rows = sorted((out / "rows").glob("*/*.json"))
    assert len(rows) == 2 * 4  # 2 replicates x (plain + 3 methods)
    table = pd.read_csv(out / "leaderboard.csv", keep_default_na=False)
    assert set(REQUIRED) <= set(table.columns)
    assert set(table["family"]) == {"plain", "fora", "teacache", "schedule"}
    assert set(table["seeds"].astype(str)) == {"0 1000000"}
    fora = table[table["method"].str.startswith("fora")].iloc[0]
    assert fora["macs_speedup"] > 1.5 and fora["num_samples"] == 4
    assert len(list((out / "wall").glob("*.json"))) == 3  # timed once per method, not per replicate
    for path in rows:
        row = json.loads(path.read_text())
        assert row["wall_speedup"] > 0 and row["role"] == "test" and row["seed"] == row["replicate"] * 1_000_000
        assert row["load_1m"] is None or row["load_1m"] >= 0
        if row["family"] != "plain":
            assert "interleaved" in row["wall_measured_on"] and row["wall_flag"] == "" and row["wall_speedup"] == 2
        assert row["seeds_recorded"] == {"plain": None, "fora": None, "teacache": None, "schedule": False}[
            row["family"]]
    (out / "leaderboard.csv").unlink()
    assert main(["bench", "--config", str(config), "--out", str(out), "--table-only"]) == 0  # benches nothing
    assert pd.read_csv(out / "leaderboard.csv", keep_default_na=False).equals(table)
    stamp = {p: p.stat().st_mtime_ns for p in rows}
    rows[-1].unlink()  # a lost row is benched again, the others are kept as they were
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 0
    again = sorted((out / "rows").glob("*/*.json"))
    assert len(again) == 8 and all(p.stat().st_mtime_ns == stamp[p] for p in again if p != rows[-1])
    wall = out / "wall" / f"{engine.slug('fora:interval=2', 'fp16')}.json"
    before = json.loads(wall.read_text())
    assert main(["bench", "--config", str(config), "--out", str(out), "--retime", "fora:interval=2"]) == 0
    assert json.loads(wall.read_text())["run_id"] != before["run_id"]  # timed again; the rows stay
    assert all(p.stat().st_mtime_ns == stamp[p] for p in again if p != rows[-1])
    capsys.readouterr()
    assert main(["bench", "--config", str(config), "--out", str(out), "--retime", "dqar"]) == 2
    one_line_error(capsys, "not a method of this table")
    # rows of other weights or other settings are never mixed into the table: one line, nothing touched
    from conftest import save_with_scheduler, tiny_fmnist_dit

    other = save_with_scheduler(tiny_fmnist_dit(seed=7), tmp_path / "other-weights")
    write_config(config, other, seeds=[0, 1])
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 2
    one_line_error(capsys, "other weights")
    write_config(config, tiny_dit_dir, seeds=[0, 1], steps=3)
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 2
    one_line_error(capsys, "has steps 4, this bench 3")
    assert all(p.stat().st_mtime_ns == stamp[p] for p in again if p != rows[-1])


def test_the_policies_form_and_the_config_form_give_the_same_row(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "flags"
    assert main(["bench", "--model", str(tiny_dit_dir), "--policies", "fora:interval=2", "--steps", "4",
                 "--batch-size", "2", "--num-samples", "4", "--fid", "--repeats", "2", "--out", str(out)]) == 0
    config = write_config(tmp_path / "c.yaml", tiny_dit_dir, batch_size=2, repeats=2)
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "config")]) == 0
    flags, from_config = rows_of(out), rows_of(tmp_path / "config")
    assert len(flags) == len(from_config) == 2
    for a, b in zip(flags, from_config):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert [r["policy"] for r in json.loads((out / "results.json").read_text())] == ["baseline", "fora:interval=2"]
    assert "| `fora:interval=2` |" in (out / "results.md").read_text()
    assert (out / "leaderboard.csv").is_file()


def test_policies_form_seed_names_a_replicate(tiny_dit_dir, tmp_path, capsys):
    base = ["bench", "--model", str(tiny_dit_dir), "--policies", "fora:interval=2", "--steps", "2", "--batch-size",
            "2", "--num-samples", "2", "--repeats", "0"]
    assert main(base + ["--seed", "60100000", "--out", str(tmp_path / "v")]) == 0
    row = json.loads((tmp_path / "v" / "results.json").read_text())[1]
    assert (row["role"], row["replicate"], row["seed"]) == ("validation", 1, 60_100_000)
    assert row["wall_flag"] == "quality-pass" and "not interleaved" in row["wall_measured_on"]
    capsys.readouterr()
    assert main(base + ["--seed", "5", "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "--seed 5 starts no test or validation replicate")
    assert main(["bench", "--config", "c.yaml", "--policy", "fora", "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "not --policy")
    assert not (tmp_path / "x").exists()


def test_validation_replicates_have_their_own_seeds_and_table(tiny_dit_dir, tmp_path, capsys):
    from cqpolicy import seeds

    starts = [seeds.replicate_start("validation", k) for k in range(seeds.TEST_REPLICATES)]
    assert starts[0] == 60_000_000 and starts[1] - starts[0] == 100_000
    assert all(seeds.role_of(s) == "validation" and not seeds.is_test_seed(s) for s in starts + [starts[-1] + 99_999])
    others = {r: [(seeds.start(r), seeds.SPAN)] for r in seeds.ROLES if r not in ("test", "validation")}
    seeds.check_disjoint({"validation": [(s, 100_000) for s in starts], "test": [(0, 10 * seeds.SPAN)], **others})
    with pytest.raises(seeds.SeedOverlapError):
        seeds.check_disjoint({"validation": [(60_000_000, 10)], "search": [(60_000_005, 10)]})
    config = write_config(tmp_path / "v.yaml", tiny_dit_dir, replicates={"role": "validation", "ids": [2]},
                          num_samples=2, batch_size=2, steps=2, repeats=0)
    out = tmp_path / "val"
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 0
    rows = rows_of(out)
    assert {(r["role"], r["replicate"], r["seed"]) for r in rows} == {("validation", 2, 60_200_000)}
    assert (out / "rows" / "2").is_dir() and pd.read_csv(out / "leaderboard.csv")["seeds"].astype(str).tolist() == [
        "60200000"] * 2
    capsys.readouterr()  # test replicates never go into a validation table, and a folder holding both has no table
    assert main(["bench", "--config", str(config), "--out", str(out), "--role", "test"]) == 2
    one_line_error(capsys, "has role 'validation', this bench 'test'")
    (out / "rows" / "0").mkdir()
    (out / "rows" / "0" / "x.json").write_text(json.dumps({**rows[0], "role": "test", "seed": 0, "replicate": 0}))
    assert main(["bench", "--config", str(config), "--out", str(out), "--table-only"]) == 2
    one_line_error(capsys, "rows of test and validation replicates")


def _artifact(path: Path, kind: str = "forecast", **meta) -> Path:
    path.mkdir(parents=True)
    (path / "policy.json").write_text(json.dumps({"kind": kind, **meta}))
    return path


def test_artifact_seed_records_are_read_and_test_seeds_refused(tiny_dit_dir, tmp_path, capsys):
    forecast = _artifact(tmp_path / "f", training={"calibration_seeds": [10_000_000, 64],
                                                   "val_seeds": [10_000_064, 32]})
    assert engine.recorded_seeds(forecast) == ([(10_000_000, 64), (10_000_064, 32)], True)
    gates = _artifact(tmp_path / "g", "gates", training={"rollout_seeds": [22_000_000, 160]},
                      warm_start={"traces": str(tmp_path / "gone")})
    assert engine.recorded_seeds(gates) == ([(22_000_000, 160)], False)  # its warm start's traces are gone
    intervals = _artifact(tmp_path / "i", "scheduler", traces=[], training={"train_seeds": [20_000_000, 20_000_001],
                                                                            "val_seeds": [20_000_002]})
    assert engine.recorded_seeds(intervals) == ([(20_000_000, 1), (20_000_001, 1), (20_000_002, 1)], True)
    assert engine.recorded_seeds(_artifact(tmp_path / "m", "mlp", traces=[str(tmp_path / "gone")]))[1] is False
    assert engine.recorded_seeds(tmp_path / "sched.json") == ([], False)
    assert engine.check_artifact(f"forecast:path={forecast}", "test") is True
    assert engine.check_artifact("fora:interval=2", "test") is None
    on_validation = _artifact(tmp_path / "v", training={"calibration_seeds": [60_000_000, 8]})
    assert engine.check_artifact(f"forecast:path={on_validation}", "test") is True
    with pytest.raises(engine.BenchError, match="records validation seeds"):  # chosen on them: not scored on them
        engine.check_artifact(f"forecast:path={on_validation}", "validation")
    # through the command: one line, exit 2, nothing written
    leaky = _artifact(tmp_path / "leaky", training={"calibration_seeds": [1_000_000, 64], "val_seeds": [5, 2]})
    assert engine.recorded_seeds(leaky)[0] == [(1_000_000, 64), (5, 2)]
    config = write_config(tmp_path / "c.yaml", tiny_dit_dir, methods=["fora:interval=2", f"forecast:path={leaky}"])
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "records test seeds (1000000...)")
    assert not (tmp_path / "out").exists()


def test_a_selection_record_is_kept_once_and_refuses_scoring_on_the_seeds_it_chose_on(tmp_path):
    from cqpolicy.policies.artifact import record_selection

    chosen = _artifact(tmp_path / "c", training={"calibration_seeds": [10_000_000, 64]})
    for _ in range(2):  # the same record twice is kept once
        record_selection(chosen, 60_100_000, 250, "rule A")
    meta = json.loads((chosen / "policy.json").read_text())
    assert meta["selected_on"] == [{"seeds": [60_100_000, 250], "by": "rule A"}] and meta["kind"] == "forecast"
    assert engine.recorded_seeds(chosen)[0] == [(10_000_000, 64), (60_100_000, 250)]
    assert engine.check_artifact(f"forecast:path={chosen}", "test") is True
    with pytest.raises(engine.BenchError, match="records validation seeds"):
        engine.check_artifact(f"forecast:path={chosen}", "validation")
    record_selection(chosen, 2_000_000, 10, "a mistake")
    with pytest.raises(engine.BenchError, match="records test seeds"):
        engine.check_artifact(f"forecast:path={chosen}", "test")


def test_the_shipped_artifacts_record_no_test_seeds(request):
    root = Path(request.config.rootpath) / "docs" / "results" / "paper" / "policies"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        ranges, _ = engine.recorded_seeds(folder)
        engine.check_artifact(f"learned:path={folder}", "test")
        assert all(first >= 10_000_000 for first, _ in ranges), folder


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"methods": []}, "methods is empty"),
    ({"seeds": [10]}, "test replicate must lie in [0, 10), got 10"),
    ({"replicates": {"role": "validation", "ids": [-1]}}, "validation replicate must lie in [0, 10)"),
    ({"replicates": {"role": "search", "ids": [0]}}, "role is test or validation"),
    ({"steps": "fifty"}, "steps is an integer"),
    ({"methods": [{"policy": "fora:interval=2", "bits": 4}]}, "a methods entry is"),
])
def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    config = write_config(tmp_path / "bad.yaml", "no-model-needed", **change)
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_burst_of_load_gets_more_timing_pairs_and_the_median(tmp_path):
    timings = iter([(51.0, 7.3), (26.2, 5.3), (11.4, 5.4), (11.2, 5.2), (11.3, 5.3)])
    record = engine.wall_record(tmp_path / "w.json", lambda: next(timings), 2, 4, 0, "run")
    assert len(record["plain_s"]) == 4 and record["settled"] and record["wall_flag"] == ""  # timed past the burst
    assert record["wall_speedup"] == pytest.approx(11.3 / 5.3)  # the medians of the last 2 pairs
    assert record["plain_reference_s"] is None  # the run's first timing: nothing to compare with yet
    assert engine.wall_record(tmp_path / "w.json", None, 2, 4, 0, "run") == record  # kept


def test_a_plain_time_off_the_runs_median_is_redone_then_flagged(tmp_path):
    wall = tmp_path / "wall"
    wall.mkdir()
    engine.write_json(wall / "a.json", {"plain_s": [10.0, 10.2, 9.9], "batch_size": 4, "run_id": "now"})
    engine.write_json(wall / "b.json", {"plain_s": [20.0, 20.0, 20.0], "batch_size": 4, "run_id": "yesterday"})
    assert engine.plain_reference(wall, 4, "now") == 10.0  # this process's plain times only
    settles = iter([(12.5, 5.0), (12.4, 5.0), (10.1, 4.0), (10.0, 4.0)])  # drifted 25%, then back
    record = engine.wall_record(wall / "m.json", lambda: next(settles), 2, 4, 0, "now")
    assert len(record["plain_s"]) == 4 and record["wall_flag"] == "" and record["plain_reference_s"] == 10.0
    assert record["wall_speedup"] == pytest.approx(2.5125 / 1.0, rel=1e-3) and len(record["loads_1m"]) == 4
    record = engine.wall_record(wall / "n.json", lambda: (12.5, 5.0), 2, 4, 0, "now")  # stays off: flagged
    assert len(record["plain_s"]) == engine.WALL_MAX_PAIRS and record["wall_flag"] == "load"
    assert record["settled"]  # steady pairs, but not at the run's speed


def test_a_flagged_wall_timing_reaches_the_row_and_the_leaderboard(tiny_dit_dir, tmp_path, monkeypatch):
    """The machine slows down between the first and the second method: the second's timing is redone, flagged."""
    calls = []

    def fake(model, policy, fmt, method_model, labels, seeds, settings):
        calls.append(policy.family)
        return (1.0, 0.5) if policy.family == "fora" else (1.5, 0.75)

    monkeypatch.setattr(engine, "time_pair", fake)
    monkeypatch.setattr(engine, "load_1m", lambda: 3.5)
    config = engine.parse_config({"model": str(tiny_dit_dir), "steps": 2, "batch_size": 2, "num_samples": 2,
                                  "seeds": [0], "methods": ["fora:interval=2", "teacache:threshold=0.3"]})
    out = tmp_path / "b"
    rows = engine.run_bench(config, out, progress=False)
    assert calls.count("fora") == 2 and calls.count("teacache") == engine.WALL_MAX_PAIRS
    flags = {r["family"]: (r["wall_flag"], r["load_1m"], r["wall_speedup"]) for r in rows}
    assert flags == {"plain": ("", 3.5, 1.0), "fora": ("", 3.5, 2.0), "teacache": ("load", 3.5, 2.0)}
    table = pd.read_csv(out / "leaderboard.csv", keep_default_na=False).set_index("family")
    assert table.loc["teacache", "wall_flag"] == "load" and table.loc["fora", "wall_flag"] == ""
    lines = {line.split("`")[1]: line for line in (out / "leaderboard.md").read_text().splitlines()
             if line.startswith("| `")}
    assert "| 2.00× (load) |" in lines["teacache:threshold=0.3"] and "(load)" not in lines["fora:interval=2"]


def test_a_wall_record_from_before_the_load_checks_serves_a_new_replicate(tiny_dit_dir, tmp_path, monkeypatch):
    """A method timed by an older bench (no wall_flag, no load_1m) gets its next replicate's row, not a KeyError:
    the row keeps the record's speedup and, like the method's earlier rows, no flag or load."""
    monkeypatch.setattr(engine, "time_pair", lambda *args: pytest.fail("the kept timing is not redone"))
    config = engine.parse_config({"model": str(tiny_dit_dir), "steps": 2, "batch_size": 2, "num_samples": 2,
                                  "seeds": [0], "methods": ["fora:interval=2"]})
    out = tmp_path / "b"
    (out / "wall").mkdir(parents=True)
    old = {"plain_s": [2.0, 2.0], "method_s": [1.0, 1.0], "settled": True, "pairs_used": 2, "wall_speedup": 2.0,
           "batch_size": 2, "first_seed": 0}
    engine.write_json(out / "wall" / f"{engine.method_slug(engine.config_methods(config.methods)[0])}.json", old)
    rows = {r["family"]: r for r in engine.run_bench(config, out, progress=False)}
    assert (rows["fora"]["wall_speedup"], rows["fora"]["wall_flag"], rows["fora"]["load_1m"]) == (2.0, None, None)


def test_learned_artifacts_are_frozen_once(tmp_path, request):
    """The learned rows name copies under OUT/policies/, listed for a resumed bench without the run; a run with
    other artifacts is refused."""
    run = tmp_path / "run"
    for name in ("train/mlp", "train/scheduler", "train/intervals-0.2"):
        (run / name).mkdir(parents=True)
        (run / name / "policy.json").write_text(name)
    done = {"train": {"mlp": str(run / "train/mlp"), "scheduler": str(run / "train/scheduler"),
                      "intervals": {"0.2": str(run / "train/intervals-0.2")}},
            "search": {"pareto": [{"policy": f"learned:path={run / 'train/mlp'},threshold=0.5,max_reuse=2",
                                   "cache_dtype": "fp16", "macs_speedup": 2.0}]}}
    done["retrain"] = {**done["train"], "retrained": False}
    for stage, result in done.items():
        (run / stage / "done.json").parent.mkdir(parents=True, exist_ok=True)
        (run / stage / "done.json").write_text(json.dumps(result))
    frozen = tmp_path / "paper" / "policies"
    config = str(Path(request.config.rootpath) / "configs" / "fmnist-dit.yaml")
    methods = engine.learned_methods(run, config, frozen)
    assert [m[0].split(",")[0] for m in methods] == [f"learned:path={frozen / n}" for n in
                                                     ("train-mlp", "train-scheduler", "train-intervals-0.2")]
    assert "max_reuse=2" in methods[1][0] and "threshold=0.5" in methods[0][0]
    assert (frozen / "train-intervals-0.2" / "policy.json").read_text() == "train/intervals-0.2"
    assert engine.learned_methods(tmp_path / "gone", config, frozen) == methods
    (run / "train/mlp/policy.json").write_text("retrained")
    with pytest.raises(engine.BenchError, match="another artifact"):
        engine.learned_methods(run, config, frozen)
    # an artifact of the run that records test seeds is refused before anything is copied
    (run / "train/mlp/policy.json").write_text(json.dumps({"kind": "mlp", "training": {"train_seeds": [7, 8]}}))
    with pytest.raises(engine.BenchError, match="records test seeds"):
        engine.learned_methods(run, config, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_plain_images_and_row_of_different_runs_are_not_paired(tiny_dit_dir, tmp_path):
    """Kept images whose plain row came from elsewhere (a run killed between the two files) are sampled again."""
    config = engine.parse_config({"model": str(tiny_dit_dir), "steps": 2, "batch_size": 2, "num_samples": 2,
                                  "seeds": [0], "methods": ["fora:interval=2"], "repeats": 0})
    out = tmp_path / "paper"
    engine.run_bench(config, out, only=["baseline"], progress=False)  # the plain rows alone
    assert [p.name.split("-")[0] for p in (out / "rows" / "0").iterdir()] == ["baseline"]
    row_file = next((out / "rows" / "0").glob("baseline-*.json"))
    row = json.loads(row_file.read_text())
    assert row["images_sha256"] and engine.plain_matches(out / "work" / "plain-0-2.npz", row_file)
    row_file.write_text(json.dumps({**row, "images_sha256": "another run"}))
    engine.run_bench(config, out, only=["baseline"], progress=False)
    assert json.loads(row_file.read_text())["images_sha256"] == row["images_sha256"]  # sampled and scored again
    with pytest.raises(engine.BenchError, match="no method to bench matches --only dqar"):
        engine.run_bench(config, out, only=["dqar"], progress=False)


def _quantized(source_dir, out, method="int8"):
    """``source_dir``'s model quantized into ``out`` (as ``cqpolicy quantize`` does); returns the report."""
    from cqpolicy.models import load_model
    from cqpolicy.quantization import quantize_model, save_quantized

    model = load_model(str(source_dir))
    return save_quantized(model, quantize_model(model, method), out)


def test_weights_entries_are_scored_against_the_full_precision_plain_model(tiny_dit_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "time_pair", lambda *args: (1.0, 0.5))
    report = _quantized(tiny_dit_dir, tmp_path / "q8")
    q8 = str(tmp_path / "q8")
    config = engine.parse_config({"model": str(tiny_dit_dir), "steps": 4, "batch_size": 4, "num_samples": 4,
                                  "seeds": [0, 1], "methods": ["fora:interval=2", {"policy": "none", "weights": q8},
                                                               {"policy": "fora:interval=2", "weights": q8}]})
    out = tmp_path / "paper"
    engine.run_bench(config, out, progress=False)
    rows = {(r["seed"], r["policy"], r["weights"]): r for r in rows_of(out)}
    assert len(rows) == 2 * 4
    digest = engine.tree_digest(tmp_path / "q8")
    assert (out / "rows" / "0" / f"{engine.slug('fora:interval=2', 'fp16')}.json").is_file()  # fp slug as before
    assert (out / "rows" / "0" / f"{engine.slug('fora:interval=2', 'fp16', digest)}.json").is_file()
    assert (out / "rows" / "0" / f"{engine.slug('none', 'none', digest)}.json").is_file()
    assert len(list((out / "wall").glob("*.json"))) == 3  # one per method, the weights ones included
    from cqpolicy.models import load_model

    params = sum(t.numel() for t in load_model(str(tiny_dit_dir)).transformer.state_dict().values())
    for seed in (0, 1000000):
        base = rows[(seed, "baseline", "fp")]
        assert base["model_bytes"] == 4 * params and base["compression_ratio"] == 1.0
        assert rows[(seed, "fora:interval=2", "fp")]["model_bytes"] == 4 * params
        weights_only, joint = rows[(seed, "none", "int8")], rows[(seed, "fora:interval=2", "int8")]
        for row in (weights_only, joint):
            assert row["model_bytes"] == report["size_bytes"] < 4 * params / 3
            assert row["compression_ratio"] == pytest.approx(report["compression_ratio"])
            assert row["compression_ratio"] > 3
            assert row["weights_dir"] == q8 and row["weights_digest"] == digest
            assert row["model_fingerprint"] == base["model_fingerprint"] and row["model"] == base["model"]
        # scored against the fp plain images: the quantized model alone is close, not identical, at the fp MACs
        assert not weights_only["bit_identical"] and 20 < weights_only["psnr_vs_baseline"] < float("inf")
        assert weights_only["policy_config"] == "none" and weights_only["family"] == "none"
        assert weights_only["macs_speedup"] == 1.0 and weights_only["cache_dtype"] == "none"
        assert joint["macs_speedup"] == pytest.approx(rows[(seed, "fora:interval=2", "fp")]["macs_speedup"])
    table = pd.read_csv(out / "leaderboard.csv")
    table.index = table["method"].str.split(":").str[0] + "/" + table["weights"]
    assert table["family"].to_dict() == {"baseline/fp": "plain", "fora/fp": "fora", "none/int8": "none+int8",
                                         "fora/int8": "fora+int8"}
    expected = sum(rows[(s, "none", "int8")]["fid"] - rows[(s, "baseline", "fp")]["fid"] for s in (0, 1000000)) / 2
    assert table.loc["none/int8", "delta_fid"] == pytest.approx(expected)  # paired with the fp plain FID
    assert table.loc["none/int8", "model_bytes"] == report["size_bytes"] == table.loc["fora/int8", "model_bytes"]
    assert table.loc["fora/fp", "compression_ratio"] == 1.0
    md = (out / "leaderboard.md").read_text()
    assert "| none+int8 | none | int8 | 1.00× |" in md and "model MiB | compression" in md


def test_weights_from_another_model_are_refused_in_one_line(tiny_dit_dir, tmp_path, capsys):
    from conftest import save_with_scheduler, tiny_fmnist_dit

    other = save_with_scheduler(tiny_fmnist_dit(seed=7), tmp_path / "other")
    _quantized(other, tmp_path / "q-other")
    out = tmp_path / "paper"
    for bad, message in [({"policy": "none", "weights": str(tmp_path / "q-other")}, "was quantized from"),
                         ({"policy": "none"}, "a methods entry is"),
                         ({"policy": "none", "weights": str(tmp_path / "missing")}, "does not exist")]:
        config = write_config(tmp_path / "paper.yaml", tiny_dit_dir, steps=2, batch_size=2, num_samples=2,
                              methods=[bad])
        assert main(["bench", "--config", str(config), "--out", str(out)]) == 2
        one_line_error(capsys, message)
        assert not out.exists()


def test_methods_entries_name_a_cache_format():
    assert engine.config_methods(["fora:interval=3", {"policy": "fora:interval=3", "cache": "int8-token"},
                                  {"policy": "fora:interval=2", "weights": "q", "cache": "int4"}]) == [
        ("fora:interval=3", "fp16", None), ("fora:interval=3", "int8-token", None), ("fora:interval=2", "int4", "q")]
    for bad in [{"policy": "fora:interval=3", "cache": "int3"}, {"policy": "none", "weights": "q", "cache": "fp16"},
                {"policy": "fora:interval=3", "bits": 4}]:
        with pytest.raises(engine.BenchError, match="methods entry"):
            engine.config_methods([bad])


@pytest.mark.parametrize("name", ["fmnist-dit-paper", "fmnist-unet-paper", "fmnist-dit-weights", "fmnist-unet-weights",
                                  "fmnist-dit-transfer-ddim25", "fmnist-dit-transfer-dpm25"])
def test_the_shipped_bench_configs_parse(request, monkeypatch, name):
    monkeypatch.chdir(request.config.rootpath)  # their artifact paths are relative to the repository
    config = engine.load_config(Path(request.config.rootpath) / "configs" / f"{name}.yaml")
    assert (config.role, config.replicates, config.num_samples) == ("test", (0, 1, 2), 1000)
    assert config.methods and config.experiment == engine.EXPERIMENT


@pytest.mark.parametrize("name, cached, prefix", [("fmnist-dit-weights", "fora:interval=3", "out/q/dit-"),
                                                   ("fmnist-unet-weights", "deepcache:interval=3,branch=0",
                                                    "out/q/unet-")])
def test_the_shipped_weights_configs_list_every_folder(request, name, cached, prefix):
    """configs/fmnist-*-weights.yaml: the fp cached row plus, per quantized folder, the weights alone and cached."""
    config = engine.load_config(Path(request.config.rootpath) / "configs" / f"{name}.yaml")
    methods = engine.config_methods(config.methods)
    assert config.learned_from is None
    assert methods[0] == (cached, "fp16", None)
    folders = {m[2] for m in methods[1:]}
    assert len(folders) >= 5 and all(f.startswith(prefix) for f in folders)
    for folder in folders:  # each weights alone, and the 4-bit formats also under the cached row's policy
        assert ("none", "none") in {m[:2] for m in methods if m[2] == folder}
        if folder.endswith(("int8", "int4", "acqe4")):
            assert (cached, "fp16") in {m[:2] for m in methods if m[2] == folder}


def test_recount_adds_a_policys_own_arithmetic_to_older_rows(tiny_dit_dir, tmp_path, monkeypatch):
    """Rows written before MACs counted a policy's arithmetic (no ``policy_macs_per_image``) get it added by
    ``--recount-macs``; the new rows of the same method already hold it, so both give the same MACs."""
    monkeypatch.setattr(engine, "time_pair", lambda *args: (1.0, 0.5))
    config = write_config(tmp_path / "c.yaml", tiny_dit_dir, seeds=[0, 1],
                          methods=["taylorseer:interval=2,order=2", "fora:interval=2"])
    out = tmp_path / "b"
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 0
    fresh = {p: json.loads(p.read_text()) for p in (out / "rows").glob("*/*.json")}
    seer = [r for r in fresh.values() if r["family"] == "taylorseer"]
    assert all(r["policy_macs_per_image"] > 0 for r in seer)
    assert all(r["policy_macs_per_image"] == 0 for r in fresh.values() if r["family"] == "fora")
    for path, row in fresh.items():  # as an older engine wrote them: without the policy's arithmetic
        old = {k: v for k, v in row.items() if k != "policy_macs_per_image"}
        old["macs_per_image"] -= row.get("policy_macs_per_image") or 0
        path.write_text(json.dumps(old))
    assert main(["bench", "--config", str(config), "--out", str(out), "--recount-macs"]) == 0
    for path, row in fresh.items():
        again = json.loads(path.read_text())
        if row["family"] != "plain":
            assert again["macs_per_image"] == pytest.approx(row["macs_per_image"])
            assert again["macs_speedup"] == pytest.approx(row["macs_speedup"])
            assert again["policy_macs_source"] == "exact, recounted on 2 samples"
