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
