"""``cqpolicy bench --policies``: a config built from the flags, through the one engine; results.json / results.md."""
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


def test_bench_takes_a_cache_format_per_method_and_times_quality_passes(tiny_dit_dir, tmp_path):
    from cqpolicy.evaluation.engine import parse_config, run_bench

    config = parse_config({"model": str(tiny_dit_dir), "steps": 4, "batch_size": 2, "num_samples": 2, "seeds": [0],
                           "repeats": 0, "fid": False,
                           "methods": ["fora:interval=2", {"policy": "fora:interval=2", "cache": "int8-token"}]})
    rows = run_bench(config, tmp_path / "b", progress=False)
    assert [r["cache_dtype"] for r in rows] == ["none", "fp16", "int8-token"]
    fp16, int8 = rows[1], rows[2]
    assert int8["cache_bytes"] < fp16["cache_bytes"]  # the int8 row really ran with an int8 cache
    assert all(r["wall_speedup"] > 0 and r["quality_pass_s"] > 0 for r in rows)  # repeats=0: from quality passes
    assert rows[0]["wall_speedup"] == 1.0 and "quality passes" in rows[1]["wall_measured_on"]
    assert rows[1]["wall_flag"] == "quality-pass" and rows[0]["fid"] is None


def test_bench_overwrite_replaces_an_earlier_run(tiny_dit_dir, tmp_path, capsys):
    argv = ["bench", "--model", str(tiny_dit_dir), "--policies", "fora:interval=2", "--steps", "2", "--num-samples",
            "2", "--batch-size", "2", "--repeats", "0", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # nothing overwritten unasked
    assert main(argv + ["--replicates", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "rows").iterdir()) == ["1"]  # the earlier run's rows are gone
    assert {r["seed"] for r in json.loads((tmp_path / "b" / "results.json").read_text())} == {1_000_000}
