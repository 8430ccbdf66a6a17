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
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(space, n_trials=2, storage=storage, study_name="k", progress=False)
    import optuna
    study = optuna.load_study(study_name="k", storage=storage)
    study.ask()  # a worker that was killed mid-trial leaves it RUNNING
    summary = run_study(space, n_trials=1, storage=storage, study_name="k", progress=False)
    states = [t.state.name for t in optuna.load_study(study_name="k", storage=storage).get_trials()]
    assert summary["stale_marked_failed"] == 1
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1


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
