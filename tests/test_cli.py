"""The ``cqpolicy sample`` command: outputs, MLflow run, and bad input (one line, exit 2, nothing left)."""
import json

import numpy as np
import pytest

from cqpolicy.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_grid_npz_metrics_and_an_mlflow_run(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["sample", "--model", str(tiny_dit_dir), "--steps", "3", "--num-samples", "6",
                           "--batch-size", "4", "--seed", "7", "--fid", "--out", str(out)], capsys)
    assert code == 0, (stdout, _)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.json", "samples.npz"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("class_accuracy", "macs", "wall_s", "num_samples", "steps", "seed", "fid"):
        assert metrics[key] is not None, key
    assert metrics["num_samples"] == 6 and metrics["steps"] == 3 and metrics["seed"] == 7
    assert metrics["macs"] > 0 and 0.0 <= metrics["class_accuracy"] <= 1.0 and metrics["fid"] > 0
    with np.load(out / "samples.npz") as data:
        assert data["images"].shape == (6, 1, 28, 28) and data["images"].dtype == np.uint8
        assert data["labels"].tolist() == [0, 1, 2, 3, 4, 5] and data["seeds"].tolist() == list(range(7, 13))

    import mlflow
    runs = mlflow.search_runs(experiment_names=["cqpolicy-sample"])
    assert len(runs) == 1 and runs.iloc[0]["params.steps"] == "3"
    assert runs.iloc[0]["metrics.fid"] == pytest.approx(metrics["fid"])


def test_compare_gives_paired_fidelity(tiny_dit_dir, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "3"]
    assert run(base + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run(base + ["--out", str(tmp_path / "b"), "--compare", str(tmp_path / "a")], capsys)[0] == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["psnr_vs_compare"] == float("inf") and metrics["ssim_vs_compare"] == pytest.approx(1.0)
    # another seed is refused: paired metrics need the same noise
    code, _, err = run(base + ["--seed", "1", "--out", str(tmp_path / "c"), "--compare", str(tmp_path / "a")],
                       capsys)
    assert code == 2 and "same seeds" in err


@pytest.mark.parametrize("extra, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance-scale", "-1"], "--guidance-scale must be non-negative"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--policy", "magic"], "unknown policy"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dit_dir, tmp_path, capsys, extra, message):
    argv = ["sample", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "2"] + extra
    code, _, err = run(argv + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_unwritable_or_nonempty_out_is_refused_and_kept(tiny_dit_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, _, err = run(["sample", "--model", str(tiny_dit_dir), "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "not writable" in err and blocker.read_text() == "keep me"

    full = tmp_path / "full"
    full.mkdir()
    (full / "grid.png").write_text("old")
    code, _, err = run(["sample", "--model", str(tiny_dit_dir), "--steps", "1", "--num-samples", "1",
                        "--out", str(full)], capsys)
    assert code == 2 and "not empty" in err and (full / "grid.png").read_text() == "old"


def test_help_for_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0 and "--guidance-scale" in capsys.readouterr().out


# ------------------------------------------------------------------------- every error: one line, exit 2

SMOOTHCACHE_30 = "/work/shared/peer-data/smoothcache-schedules/30-N-2-fora.json"


def visible_lines(err: str) -> list[str]:
    """The lines a terminal shows: a progress bar redrawn with carriage returns (and erased on close) is
    what follows its last carriage return."""
    return [shown for line in err.split("\n") if (shown := line.split("\r")[-1].strip())]


def assert_one_line_error(command, code, err, *fragments):
    lines = visible_lines(err)
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"cqpolicy {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def schedule_file(tmp_path, steps=30):
    """The published 30-step SmoothCache schedule (a copy of its format where the peer data is missing)."""
    from pathlib import Path

    if Path(SMOOTHCACHE_30).is_file():
        return SMOOTHCACHE_30
    path = tmp_path / "30-N-2-fora.json"
    entries = [1, 0] * (steps // 2 - 1) + [1, 1]
    path.write_text(json.dumps({"attn": entries, "mlp": entries}))
    return str(path)


def test_a_schedule_for_another_step_count_is_one_line(tiny_dit_dir, tmp_path, capsys):
    schedule = schedule_file(tmp_path)
    code, _, err = run(["sample", "--model", str(tiny_dit_dir), "--policy", f"schedule:path={schedule}",
                        "--steps", "50", "--num-samples", "2", "--out", str(tmp_path / "s")], capsys)
    assert_one_line_error("sample", code, err, "30 steps", "50")
    # bench meets it mid-run, after the plain model ran: the open progress bar is closed before the error
    code, _, err = run(["bench", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "1", "--repeats", "0",
                        "--policies", "none", f"schedule:path={schedule}", "--out", str(tmp_path / "b")], capsys)
    assert_one_line_error("bench", code, err, "30 steps")
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--guidance-scale", "nan"], ["--guidance-scale must be a finite number"]),
    (["--guidance-scale", "inf"], ["--guidance-scale must be a finite number"]),
    (["--seed", "-1"], ["--seed must be non-negative"]),
    (["--seed", str(2 ** 70)], ["--seed must be non-negative"]),
    (["--device", "foo"], ["--device 'foo' is not a device"]),
])
def test_bad_sampling_values_are_one_line_before_anything_runs(tiny_dit_dir, tmp_path, capsys, extra, fragments):
    for command in (["sample"], ["bench", "--policies", "none"], ["trace"]):
        code, _, err = run(command + ["--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "2", *extra,
                                      "--out", str(tmp_path / "out")], capsys)
        assert_one_line_error(command[0], code, err, *fragments)
        assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_loadable_model_is_one_line(tiny_dit_dir, tmp_path, capsys):
    broken = tmp_path / "broken" / "transformer"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    code, _, err = run(["sample", "--model", str(broken.parent), "--steps", "2", "--num-samples", "2",
                        "--out", str(tmp_path / "o1")], capsys)
    assert_one_line_error("sample", code, err, "config.json", "not valid JSON")
    no_weights = tmp_path / "no-weights" / "transformer"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text((tiny_dit_dir / "transformer" / "config.json").read_text())
    code, _, err = run(["sample", "--model", str(no_weights.parent), "--steps", "2", "--num-samples", "2",
                        "--out", str(tmp_path / "o2")], capsys)
    assert_one_line_error("sample", code, err, str(no_weights))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--steps", "abc", "--out", "o"], "argument --steps: invalid int value: 'abc'"),
    (["sample", "--scheduler", "euler", "--out", "o"], "argument --scheduler: invalid choice: 'euler'"),
    (["sample"], "the following arguments are required: --out"),
    (["bench", "--out", "o"], "the following arguments are required: --policies"),
    (["train", "--kind", "tree", "--traces", "t", "--out", "o"], "argument KIND: invalid choice"),
    (["train", "tree", "--traces", "t", "--out", "o"], "argument KIND: invalid choice"),
    (["train", "gates", "--traces", "t", "--model", "m", "--out", "o"], "unrecognized arguments: --traces"),
    (["train", "forecast", "--model", "m", "--out", "o"], "required: --schedule"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_argument_errors_are_one_line_not_the_whole_usage(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(visible_lines(err)) == 1 and fragment in err and "--help" in err, err


def _artifact(tmp_path, kind="mlp"):
    """A deployable artifact written directly (no training): an untrained MLP or an all-compute table."""
    from cqpolicy.policies.features import STEP_FEATURES
    from cqpolicy.policies.artifact import save_artifact
    from cqpolicy.policies.networks import ReuseMLP

    model = {"class": "DiTTransformer2DModel", "model_id": "tiny", "model_hash": "0" * 16, "num_blocks": 2,
             "units": ["attn1", "ff"], "steps": 2, "scheduler": "ddim", "guidance_scale": 3.0}
    if kind == "mlp":
        n = len(STEP_FEATURES)
        meta = {"kind": "mlp", "features": list(STEP_FEATURES), "hidden": 4, "default_threshold": 0.1,
                "normalization": {"mean": [0.0] * n, "std": [1.0] * n}, "model": model}
        tensors = {f"mlp.{k}": v for k, v in ReuseMLP(n, 4).state_dict().items()}
    else:
        import torch

        meta = {"kind": "scheduler", "features": [], "hidden": 0, "default_threshold": 0.5,
                "normalization": {"mean": [], "std": []}, "model": model}
        tensors = {"table": torch.ones(2, 2, 2, dtype=torch.uint8)}
    path = tmp_path / f"artifact-{kind}"
    save_artifact(path, meta, tensors)
    return path


def _edit(key, value):
    def edit(meta):
        target = meta
        *parents, last = key.split(".")
        for k in parents:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


@pytest.mark.parametrize("kind, damage, fragment", [
    ("mlp", lambda p: (p / "policy.json").write_text("{oops"), "is not valid JSON"),
    ("mlp", lambda p: (p / "policy.json").write_bytes(b"\xff\xfe garbage"), "is not UTF-8"),
    ("mlp", lambda p: ((p / "policy.json").unlink(), (p / "policy.json").mkdir()), "cannot read"),
    ("mlp", _edit("model.units", KeyError), "model.units is missing"),
    ("mlp", _edit("model.steps", "2"), "model.steps is missing or not a positive integer"),
    ("mlp", _edit("features", KeyError), "features is missing"),
    ("mlp", _edit("features", ["in_l1", "step"] + [f"f{i}" for i in range(11)]), "feature 'step' is not one"),
    ("mlp", _edit("hidden", 8), "its weights do not fit an MLP of 13 features and 8 hidden units"),
    ("mlp", _edit("normalization.std", [1.0]), "normalization.std is not 13 finite numbers"),
    ("mlp", _edit("default_threshold", None), "default_threshold is missing"),
    ("mlp", _edit("kind", "scheduler"), "holds no 'table'"),
    ("scheduler", _edit("model.num_blocks", 3), "its table is [2, 2, 2], not [steps, blocks, units] = [2, 3, 2]"),
])
def test_a_damaged_policy_artifact_is_one_line(tiny_dit_dir, tmp_path, capsys, kind, damage, fragment):
    path = _artifact(tmp_path, kind)
    if getattr(damage, "__name__", "") == "edit":
        meta = json.loads((path / "policy.json").read_text())
        damage(meta)
        (path / "policy.json").write_text(json.dumps(meta))
    else:
        damage(path)
    before = sorted(p.name for p in path.iterdir())
    code, _, err = run(["sample", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "2",
                        "--policy", f"learned:path={path}", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error("sample", code, err, fragment)
    assert sorted(p.name for p in path.iterdir()) == before and not (tmp_path / "out").exists()


def test_an_artifact_for_other_weights_is_one_line(tiny_dit_dir, tmp_path, capsys):
    path = _artifact(tmp_path, "scheduler")  # its stored weight hash is not the tiny model's
    code, _, err = run(["sample", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "2",
                        "--policy", f"learned:path={path}", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error("sample", code, err, "weight hash 0000000000000000", "other weights")


class NotATensor:
    """Any pickled object that is not a tensor: ``weights_only=True`` refuses it."""


@pytest.fixture
def inception_files(tmp_path):
    import torch

    files = {"pickled": tmp_path / "pickled.pth", "text": tmp_path / "text.pth", "other": tmp_path / "other.pth",
             "empty": tmp_path / "empty.pth"}
    torch.save({"a": NotATensor()}, files["pickled"])
    files["text"].write_text("not a weights file\n")
    torch.save({"w": torch.zeros(2)}, files["other"])
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("name, message", [
    ("pickled", "is not a tensor-only weights file (it holds pickled objects"),
    ("text", "is not a tensor-only weights file"),
    ("empty", "is not a tensor-only weights file"),
    ("other", "does not hold torch-fidelity's InceptionV3 state dict"),
])
def test_inception_weights_that_are_not_tensor_only_inception_weights_are_refused(inception_files, name, message):
    from cqpolicy.evaluation.quality import find_inception_weights

    with pytest.raises(ValueError) as exc:
        find_inception_weights(inception_files[name])
    assert str(inception_files[name]) in str(exc.value) and message in str(exc.value)
    assert len(str(exc.value).splitlines()) == 1


def test_a_pickled_inception_weights_file_is_one_line_in_the_cli(tiny_xl_pipeline_dir, inception_files, tmp_path,
                                                                 capsys):
    reference = tmp_path / "real.npz"
    np.savez(reference, images=np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16), dtype=np.uint8))
    code, _, err = run(["sample", "--model", str(tiny_xl_pipeline_dir), "--steps", "2", "--num-samples", "2",
                        "--fid", "--fid-reference", str(reference), "--inception-weights",
                        str(inception_files["pickled"]), "--out", str(tmp_path / "out")], capsys)
    lines = visible_lines(err)
    # diffusers draws its own "Loading pipeline components" bar before anything can fail; the error is the last line
    assert code == 2 and "Traceback" not in err and "UnpicklingError" not in err, err
    assert lines[-1].startswith("cqpolicy sample: error: Inception weights ") and str(inception_files["pickled"]) in lines[-1]
    assert "not a tensor-only weights file" in lines[-1]
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert not (tmp_path / "out").exists()
