"""benchmarks/research/trace_change.py: medians of a trace run by fifth of sampling (and unit type)."""
import numpy as np
from conftest import load_script

from cqpolicy.cli import main
from cqpolicy.tracing import TraceReader


def test_medians_by_fifth_and_unit_are_those_of_the_trace_rows(tiny_dit_dir, tmp_path):
    assert main(["trace", "--model", str(tiny_dit_dir), "--steps", "10", "--num-samples", "2", "--batch-size", "2",
                 "--probes", "local", "--out", str(tmp_path / "t")]) == 0
    script = load_script("trace_change", "benchmarks/research")
    rows = script.summarise("tiny", str(tmp_path / "t"))
    frame = TraceReader(tmp_path / "t").table().to_pandas()
    assert [r["progress"] for r in rows] == ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"]
    last = frame[frame["step"] >= 8]  # 10 steps: the last fifth is steps 8 and 9
    assert float(rows[-1]["median_output_change"]) == round(float(np.median(last["out_rel_l1_prev"].dropna())), 4)
    assert float(rows[-1]["median_reuse_impact"]) == round(float(np.median(last["impact_local"].dropna())), 5)
    units = script.summarise("tiny", str(tmp_path / "t"), by_unit=True)
    assert len(units) == 5 * frame["unit"].nunique() and {r["samples"] for r in units} == {2}
