"""Optuna search: space validation, every knob changes what runs, workers, resume, MLflow runs."""
import pytest
import yaml

from cqpolicy.cli import main
from cqpolicy.search import SpaceError, load_space, parse_space
from cqpolicy.search.study import Evaluator, make_storage, run_study

SHIPPED = "configs/search/fmnist-dit.yaml"


@pytest.fixture
def repo_config(request):
    from pathlib import Path

    return Path(request.config.rootpath) / SHIPPED


def tiny_space(tiny_dit_dir, tmp_path, **overrides):
    data = {"model": str(tiny_dit_dir), "steps": 6, "num_samples": 4, "batch_size": 4, "objectives":
            ["macs_speedup", "fid"], "min_psnr": 5.0, "families": {"fora": {"interval": {"int": [2, 4]}},
                                                                     "teacache": {"threshold": {"float": [0.05, 2.0]}}},
            "cache": {"dtype": ["fp16", "int8"], "granularity": ["tensor", "token"]}, **overrides}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_space(path)


@pytest.mark.parametrize("name", ["fmnist-dit", "fmnist-dit-forecast", "fmnist-unet-forecast"])
def test_the_shipped_spaces_parse(name, request):
    """(fmnist-dit-joint needs the weights folders its header makes first.)"""
    from pathlib import Path

    folder = Path(request.config.rootpath) / "configs" / "search"
    assert {p.stem for p in folder.glob("*.yaml")} == {"fmnist-dit", "fmnist-dit-joint", "fmnist-dit-forecast",
                                                       "fmnist-unet-forecast"}
    space = load_space(folder / f"{name}.yaml")
    assert space.families and (space.forecast is not None) == name.endswith("forecast")


@pytest.mark.parametrize("families, message", [
    ({"magic": {}}, "unknown policy 'magic'"),
    ({"fora": {"speed": {"int": [1, 2]}}}, "has no option 'speed'"),
    ({"fora": {"interval": {"int": [5, 2]}}}, "empty range"),
    ({"teacache": {"threshold": {"float": [0.1, 0.1]}}}, "empty range"),
    ({"fora": {"interval": {"int": [0, 2]}}}, "interval must be at least 1"),
    ({"fora": {"interval": [2, 3]}}, "expected one of"),
])
def test_bad_spaces_fail_before_any_trial(families, message):
    with pytest.raises(SpaceError, match=message):
        parse_space({"families": families}, "space.yaml")
    with pytest.raises(SpaceError, match="unknown sampler"):
        parse_space({"sampler": "grid", "families": {"fora": {}}}, "space.yaml")
    with pytest.raises(SpaceError, match="cache formats"):
        parse_space({"cache": {"dtype": ["int3"]}, "families": {"fora": {}}}, "space.yaml")


def test_every_parameter_of_the_shipped_space_changes_what_runs(repo_config, tiny_dit_dir):
    """Each parameter at its two ends (and each cache format) gives different images or MACs."""
    from dataclasses import replace

    space = load_space(repo_config)
    space = replace(space, model=str(tiny_dit_dir), steps=40, num_samples=2, batch_size=2, min_psnr=None)
    evaluate = Evaluator(space)
    def run(family, values):
        result = evaluate(family + ":" + ",".join(f"{k}={v}" for k, v in values.items()), "fp16")
        return result["psnr_vs_baseline"], result["macs_speedup"], result["reuse_ratio"]

    for family, params in space.families.items():
        ends = {p.name: (p.low, p.high) if p.kind == "float" else (int(p.low), int(p.high)) for p in params}
        for p in params:
            # the other parameters at their low ends, then at their high ends: one setting must show the change
            changed = False
            for side in (0, 1):
                base = {name: pair[side] for name, pair in ends.items()}
                low, high = ({**base, p.name: end} for end in ends[p.name])
                changed |= run(family, low) != run(family, high)
            assert changed, f"{family}.{p.name} changes nothing"
    formats = [evaluate("fora:interval=2", fmt)["psnr_vs_baseline"]
               for fmt in ("fp16", "int8", "int4", "int4-token")]
    assert len(set(formats)) == len(formats)


def test_two_workers_on_one_journal_record_every_trial_once(tiny_dit_dir, tmp_path):
    space = tiny_space(tiny_dit_dir, tmp_path)
    journal = tmp_path / "journal.log"
    summary = run_study(space, n_trials=4, storage=str(journal), study_name="w", workers=2, progress=False)
    import optuna
    trials = optuna.load_study(study_name="w", storage=make_storage(str(journal))).get_trials()
    assert summary["trials"] == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({(t.user_attrs["policy"], t.user_attrs["cache_dtype"]) for t in trials}) >= 2
    import mlflow
    runs = mlflow.search_runs(experiment_names=["cqpolicy-search"])
    parent = runs[runs["tags.mlflow.runName"] == "study-w"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert len(parent) == 1 and len(children) == 4


def test_a_killed_study_resumes_with_its_trials_intact(tiny_dit_dir, tmp_path, capsys):
    space = tiny_space(tiny_dit_dir, tmp_path)
    storage = str(tmp_path / "journal.log")  # no heartbeats: a RUNNING trial at launch was left by a killed one
    run_study(space, n_trials=2, storage=storage, study_name="k", progress=False)
    import optuna
    study = optuna.load_study(study_name="k", storage=make_storage(storage))
    study.ask()  # a worker that was killed mid-trial leaves it RUNNING
    summary = run_study(space, n_trials=1, storage=storage, study_name="k", progress=False)
    states = [t.state.name for t in optuna.load_study(study_name="k", storage=make_storage(storage)).get_trials()]
    assert summary["stale_marked_failed"] == 1
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1


def test_a_database_study_fails_and_retries_only_trials_whose_heartbeat_stopped(tiny_dit_dir, tmp_path, monkeypatch):
    import time

    import optuna

    from cqpolicy.search import study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_S", 1)  # grace period 3 s
    space = tiny_space(tiny_dit_dir, tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(space, n_trials=1, storage=storage, study_name="h", progress=False)
    study = optuna.load_study(study_name="h", storage=make_storage(storage))
    dead = study.ask({"family": optuna.distributions.CategoricalDistribution(["fora", "teacache"])})
    study._storage.record_heartbeat(dead._trial_id)  # a worker that died mid-trial: its last heartbeat
    time.sleep(4)
    alive = study.ask()  # another host's trial in flight, beating
    study._storage.record_heartbeat(alive._trial_id)
    summary = run_study(space, n_trials=1, storage=storage, study_name="h", progress=False)
    trials = optuna.load_study(study_name="h", storage=make_storage(storage)).get_trials()
    by_state = {s: [t.number for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL", "RUNNING")}
    assert summary["stale_marked_failed"] == 0  # Optuna's heartbeat check, not the launch, failed it
    assert by_state["FAIL"] == [dead.number] and by_state["RUNNING"] == [alive.number]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params["family"] == dead.params["family"]  # re-run with the dead trial's drawn values


def test_search_cli_quick_and_bad_storage(tiny_dit_dir, tmp_path, capsys):
    space_file = tmp_path / "s.yaml"
    space_file.write_text(yaml.safe_dump({"model": str(tiny_dit_dir), "steps": 50, "num_samples": 64,
                                          "quick": {"steps": 5, "num_samples": 2, "batch_size": 2},
                                          "families": {"fora": {"interval": {"int": [2, 3]}}}}))
    assert main(["search", "--config", str(space_file), "--n-trials", "2", "--quick",
                 "--storage", str(tmp_path / "j.log")]) == 0
    assert "Pareto-optimal trials" in capsys.readouterr().out
    code = main(["search", "--config", str(space_file), "--n-trials", "1",
                 "--storage", "postgresql://nobody@127.0.0.1:1/none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot open Optuna storage" in err[0]


@pytest.fixture
def int8_dir(tiny_dit_dir, tmp_path):
    """The tiny DiT quantized to int8, as ``cqpolicy quantize`` writes it."""
    from cqpolicy.models import load_model
    from cqpolicy.quantization import quantize_model, save_quantized

    model = load_model(str(tiny_dit_dir))
    save_quantized(model, quantize_model(model, "int8"), tmp_path / "q8")
    return str(tmp_path / "q8")


def test_bad_weights_choices_fail_before_any_trial(tiny_dit_dir, tmp_path):
    from conftest import save_with_scheduler, tiny_fmnist_dit

    from cqpolicy.models import load_model
    from cqpolicy.quantization import quantize_model, save_quantized

    other = load_model(str(save_with_scheduler(tiny_fmnist_dit(seed=7), tmp_path / "other")))
    save_quantized(other, quantize_model(other, "int8"), tmp_path / "q-other")
    base = {"model": str(tiny_dit_dir), "families": {"fora": {}}}
    for weights, message in [({"choices": ["fp", str(tmp_path / "nope")]}, "does not exist"),
                             ({"choices": ["fp", str(tmp_path / "q-other")]}, "was quantized from"),
                             (["fp"], "weights must be"), ({"choices": ["fp", "fp"]}, "distinct")]:
        with pytest.raises(SpaceError, match=message) as info:
            parse_space({**base, "weights": weights}, "space.yaml")
        assert "\n" not in str(info.value)
    with pytest.raises(SpaceError, match="unknown key"):
        parse_space({**base, "weight": {"choices": ["fp"]}}, "space.yaml")


def test_a_joint_study_picks_weights_and_minimises_model_bytes(tiny_dit_dir, tmp_path, int8_dir):
    space = tiny_space(tiny_dit_dir, tmp_path, weights={"choices": ["fp", int8_dir]},
                       objectives=["macs_speedup", "fid", "model_bytes"])
    assert space.weights == ("fp", int8_dir) and space.directions[-1] == "minimize"
    evaluate = Evaluator(space)
    fp, q8 = evaluate("fora:interval=2", "fp16"), evaluate("fora:interval=2", "fp16", int8_dir)
    assert q8["model_bytes"] < fp["model_bytes"] / 3 and q8["compression_ratio"] > 3 and fp["compression_ratio"] == 1.0
    assert q8["psnr_vs_baseline"] != fp["psnr_vs_baseline"]  # the knob changes what runs
    assert q8["macs_speedup"] == fp["macs_speedup"]
    summary = run_study(space, n_trials=3, storage=str(tmp_path / "j.log"), study_name="joint", progress=False)
    import optuna

    trials = optuna.load_study(study_name="joint", storage=make_storage(str(tmp_path / "j.log"))).get_trials()
    sizes = {"fp": fp["model_bytes"], int8_dir: q8["model_bytes"]}
    assert summary["trials"] == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.params.get("weights") == t.user_attrs["weights"] and t.values[2] == sizes[t.user_attrs["weights"]]
    assert all(p["weights"] in sizes for p in summary["pareto"])
    import mlflow

    logged = mlflow.search_runs(experiment_names=["cqpolicy-search"])
    logged = logged[logged["tags.mlflow.runName"].str.startswith("trial-")]
    assert set(logged["params.weights"]) <= {"fp", "int8"} and logged["metrics.model_bytes"].notna().all()


def test_a_forecast_space_fits_each_trials_schedule_and_scores_the_forecast(tiny_dit_dir, tmp_path, capsys):
    from cqpolicy.policies.artifact import load_artifact

    space = tiny_space(tiny_dit_dir, tmp_path, sampler="nsga2", population=2, min_psnr=None, cache={"dtype": ["fp16"]},
                       forecast={"order": 2, "samples": 2, "val_samples": 1, "batch_size": 2},
                       families={"phased": {"early": {"int": [2, 3]}, "late": {"int": [2, 4]},
                                            "split": {"float": [0.3, 0.7]}}})
    summary = run_study(space, n_trials=3, storage=str(tmp_path / "j.log"), study_name="f", progress=False,
                        artifacts=tmp_path / "fits")
    assert summary["states"]["COMPLETE"] == 3
    import optuna
    for trial in optuna.load_study(study_name="f", storage=make_storage(str(tmp_path / "j.log"))).get_trials():
        folder = tmp_path / "fits" / f"trial-{trial.number}"
        assert trial.user_attrs["policy"] == f"forecast:path={folder}"
        meta = load_artifact(folder)[0]
        assert meta["schedule"] == trial.user_attrs["schedule"] and trial.user_attrs["schedule"].startswith("phased:")
        assert meta["training"]["calibration_seeds"][0] == 10_000_000  # calibration seeds fit, search seeds score
        assert trial.user_attrs["macs_speedup"] > 1
    assert all(p["policy"].startswith("forecast:path=") and "schedule" in p for p in summary["pareto"])


def test_a_forecast_space_refuses_families_that_are_not_static(tmp_path, capsys):
    with pytest.raises(SpaceError, match="'teacache' decides per sample"):
        parse_space({"forecast": {}, "families": {"fora": {}, "teacache": {}}}, "space.yaml")
    with pytest.raises(SpaceError, match="population must be at least 2"):
        parse_space({"sampler": "nsga2", "population": 1, "families": {"fora": {}}}, "space.yaml")
    with pytest.raises(SpaceError, match="forecast: unknown key 'rounds'"):
        parse_space({"forecast": {"rounds": 2}, "families": {"fora": {}}}, "space.yaml")
    space_file = tmp_path / "s.yaml"
    space_file.write_text(yaml.safe_dump({"forecast": {"order": 2}, "families": {"taylorseer": {}}}))
    assert main(["search", "--config", str(space_file), "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a fitted forecast needs a static schedule" in err[0]


def test_a_resumed_study_draws_new_points(tiny_dit_dir, tmp_path):
    """The sampler's seed moves past the trials a study holds: a resume does not redraw its first points."""
    import optuna

    space = tiny_space(tiny_dit_dir, tmp_path, min_psnr=None, cache={"dtype": ["fp16"]},
                       families={"teacache": {"threshold": {"float": [0.05, 2.0]}}})
    storage = str(tmp_path / "j.log")
    for _ in range(2):
        run_study(space, n_trials=2, storage=storage, study_name="r", progress=False)
    trials = optuna.load_study(study_name="r", storage=make_storage(storage)).get_trials()
    assert len({t.params["teacache.threshold"] for t in trials}) == 4
