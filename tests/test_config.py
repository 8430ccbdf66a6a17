"""The typed run config: packaged configs by name from any folder, defaults in one place, bad keys one line."""
from pathlib import Path

import pytest

from cqpolicy import defaults
from cqpolicy.cli import main
from cqpolicy.config import ConfigError, RunConfig, load_run_config, packaged_configs, parse_run_config


def test_packaged_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged ones are found by name
    assert {"fmnist-dit", "fmnist-unet", "fmnist-dit-paper", "fmnist-unet-paper"} <= set(packaged_configs())
    dit, unet = load_run_config("fmnist-dit"), load_run_config("fmnist-unet")
    assert dit.model == "fmnist-dit" and unet.model == "fmnist-unet"
    assert dit.retrain is False and load_run_config("fmnist-dit", quick=True).retrain is True  # as the YAML says
    quick = load_run_config("fmnist-dit", quick=True)
    assert quick.steps == 10 and quick.bench.seeds == (0, 1) and quick.train.gates.max_epochs == 1
    assert load_run_config("configs/fmnist-unet.yaml") == unet  # the name as a path under configs/ too
    with pytest.raises(ConfigError, match="packaged config"):
        load_run_config("fmnist-vit")


def test_defaults_come_from_one_place():
    config = parse_run_config({}, "empty")
    assert config == RunConfig(source="empty")
    assert config.steps == defaults.STEPS and config.train.gates is None
    assert parse_run_config({"train": {"gates": {}}}, "g").train.gates.budget_range == defaults.GATES_BUDGET_RANGE


@pytest.mark.parametrize("mapping, message", [
    ({"stepz": 5}, "unknown key 'stepz'"),
    ({"trace": {"num_sample": 5}}, "trace: unknown key 'num_sample'"),
    ({"steps": "fifty"}, "steps must be int"),
    ({"retrain": "yes"}, "retrain must be bool"),
    ({"bench": {"seeds": [0, "one"]}}, "bench seeds must be int"),
    ({"quick": {"search": {"n_trial": 3}}}, "search: unknown key 'n_trial'"),  # checked without --quick too
    ({"train": ["a"]}, "train must be a mapping"),
])
def test_bad_configs_are_one_line_errors(mapping, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(mapping, "bad.yaml")


def test_run_refuses_a_bad_config_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: fmnist-dit\ntrace: {num_samples: many}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trace num_samples must be int" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_relative_prompt_file_is_read_from_the_config_folder_when_not_in_the_working_directory(tmp_path,
                                                                                                monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "prompts.txt").write_text("a bag\n")
    (tmp_path / "cfg" / "run.yaml").write_text("model: fmnist-sd3\nprompts: prompts.txt\n")
    monkeypatch.chdir(tmp_path)
    assert Path(load_run_config("cfg/run.yaml").prompts).resolve() == tmp_path / "cfg" / "prompts.txt"
    (tmp_path / "prompts.txt").write_text("a coat\n")  # the working directory's comes first
    assert load_run_config("cfg/run.yaml").prompts == "prompts.txt"
