import json

import pytest

from cqpolicy.cli import main


def test_bench_rows_and_invariants(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_dit_dir), "--policies", "none", "fora:interval=2",
                 "--steps", "4", "--num-samples", "4", "--batch-size", "2", "--repeats", "1", "--fid",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in rows] == ["baseline", "none", "fora:interval=2"]
    for row in rows:
        for key in ("policy", "macs_speedup", "wall_speedup", "fid", "psnr_vs_baseline", "ssim_vs_baseline",
                    "bit_identical", "reuse_ratio", "cache_bytes", "class_accuracy"):
            assert key in row, key
    base, none, fora = rows
    assert none["bit_identical"] and none["macs_speedup"] == pytest.approx(1.0) and none["reuse_ratio"] == 0
    assert not fora["bit_identical"] and fora["reuse_ratio"] == pytest.approx(0.5)
    assert fora["macs_speedup"] > 1.3 and fora["cache_bytes"] > 0 and none["cache_bytes"] == 0
    assert "| `fora:interval=2` |" in printed

    import mlflow
    assert len(mlflow.search_runs(experiment_names=["cqpolicy-bench"])) == 3


def test_bench_rejects_a_bad_policy_before_running(tiny_dit_dir, tmp_path, capsys):
    code = main(["bench", "--model", str(tiny_dit_dir), "--policies", "none", "fora:every=2",
                 "--out", str(tmp_path / "b")])
    assert code == 2 and "has no option 'every'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bench_takes_a_cache_format_per_method_and_times_quality_passes(tiny_dit_dir):
    from cqpolicy.evaluation.bench import bench
    from cqpolicy.models import load_model
    from cqpolicy.sampling import SampleSettings

    model = load_model(str(tiny_dit_dir))
    rows = bench(model, ["fora:interval=2", ("fora:interval=2", "int8-token")], SampleSettings(steps=4, batch_size=2),
                 num_samples=2, repeats=0, progress=False)
    assert [r["cache_dtype"] for r in rows] == ["none", "fp16", "int8-token"]
    fp16, int8 = rows[1], rows[2]
    assert int8["cache_bytes"] < fp16["cache_bytes"]  # the int8 row really ran with an int8 cache
    assert all(r["wall_speedup"] > 0 and r["quality_pass_s"] > 0 for r in rows)  # repeats=0: from quality passes
    assert rows[0]["wall_speedup"] == 1.0 and "quality pass" in rows[0]["wall_measured_on"]
