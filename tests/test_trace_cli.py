"""`cqpolicy trace`: shards + manifest + heatmaps, resume without duplicates, downstream labels, bad input."""
import json

import numpy as np

from cqpolicy import seeds as seed_roles
from cqpolicy.cli import main
from cqpolicy.tracing.store import TraceReader

BASE = ["trace", "--steps", "4", "--num-samples", "4", "--batch-size", "2", "--guidance-scale", "2"]


def test_trace_writes_a_readable_run_and_resumes(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(BASE + ["--model", str(tiny_dit_dir), "--probes", "local,downstream", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "local impact vs downstream change" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["policy"] == "none" and manifest["probes"] == "local,downstream"
    first = seed_roles.start("trace")  # the trace role's seeds by default, never test seeds
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [f"shard-{first}-{first + 1}.parquet",
                                                                   f"shard-{first + 2}-{first + 3}.parquet"]
    assert (out / "plots" / "heatmaps.png").stat().st_size > 1000
    table = TraceReader([out]).table()
    assert table.num_rows == 4 * 2 * 2 * 2 * 4  # samples x CFG rows x steps x blocks x units
    cols = table.to_pydict()
    probed = ~np.isnan(np.asarray(cols["downstream_psnr"], dtype=float))
    assert probed.sum() == 4 * 2  # one (step, block, unit) per sample, both CFG rows
    # resume: a second call finds every batch done and adds nothing
    assert main(BASE + ["--model", str(tiny_dit_dir), "--probes", "local,downstream", "--out", str(out)]) == 0
    assert "0 new from 0 batches (2 already done)" in capsys.readouterr().out
    assert TraceReader([out]).table().num_rows == table.num_rows
    import mlflow
    assert len(mlflow.search_runs(experiment_names=["cqpolicy-trace"])) == 2


def test_trace_refuses_a_folder_of_another_run(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(BASE + ["--model", str(tiny_dit_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    before = (out / "manifest.json").read_text()
    assert main(BASE[:2] + ["5"] + BASE[3:] + ["--model", str(tiny_dit_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run" in err[0]
    assert (out / "manifest.json").read_text() == before


def test_bad_probe_name(tiny_dit_dir, tmp_path, capsys):
    assert main(BASE + ["--model", str(tiny_dit_dir), "--probes", "global", "--out", str(tmp_path / "r")]) == 2
    assert "unknown probe 'global'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
