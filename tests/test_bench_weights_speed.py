"""scripts/bench_weights_speed.py on a tiny DiT: every variant gets a row, ratios and errors are sane, bad input
exits 2 with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_weights_speed.py"


def test_every_variant_has_a_row_and_missing_libraries_are_rows_not_errors(tiny_dit_dir, tmp_path, monkeypatch):
    bench = load_script("bench_weights_speed")
    for name in ("torchao", "optimum", "optimum.quanto"):  # as if not installed, whatever this venv holds
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "ws"
    report = bench.main(["--model", str(tiny_dit_dir), "--batch-size", "4", "--rounds", "2", "--calls", "1",
                         "--out", str(out)])
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == list(bench.VARIANTS)
    for variant in ("torchao-int8wo", "quanto-qint8", "quanto-qint4"):
        assert rows[variant]["status"] == "not installed"
    for variant in ("fp32", *bench.OURS):
        r = rows[variant]
        assert r["status"] == "ok"
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["ratio_to_fp32"] > 0
        assert r["quantized_layers"] == (0 if variant == "fp32" else r["linear_conv_layers"])
    assert rows["fp32"]["rel_l2_error"] == 0
    assert rows["int8"]["rel_l2_error"] < 0.02
    assert rows["int8"]["resident_bytes"] < rows["fp32"]["resident_bytes"]
    table = (tmp_path / "ws.md").read_text()
    for variant in bench.VARIANTS:
        assert f"| `{variant}` |" in table
    assert table.count("not installed") == 3
    assert json.loads((tmp_path / "ws.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bench = load_script("bench_weights_speed")
    with pytest.raises(ValueError, match="unknown variant"):
        bench.main(["--variants", "int3"])
    with pytest.raises(ValueError, match="unknown model"):
        bench.main(["--model", "no-such-model", "--out", str(tmp_path / "x")])
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch-size", "0"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["bench_weights_speed: error: --batch-size must be at least 1, got 0"]
    assert not (tmp_path / "x.md").exists()
