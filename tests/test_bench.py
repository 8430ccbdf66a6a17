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
