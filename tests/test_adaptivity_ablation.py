"""benchmarks/research/adaptivity_ablation.py: an adaptive policy's mean schedule at its own MACs."""
import json

import pytest
import torch
from conftest import load_script

from cqpolicy.policies.families.table import load_table


def test_the_mean_schedule_of_a_static_policy_is_that_policy(tiny_dit_dir, tmp_path):
    script = load_script("adaptivity_ablation", "benchmarks/research")
    out = tmp_path / "ab"
    assert script.main(["--policy", "fora:interval=3", "--model", str(tiny_dit_dir), "--steps", "7",
                        "--samples", "4", "--batch-size", "2", "--out", str(out)]) == 0
    table, units = load_table(out / "mean-schedule.safetensors")
    assert units == ("attn1", "ff")
    expected = torch.tensor([s % 3 == 0 for s in range(7)], dtype=torch.uint8)
    assert torch.equal(table, expected[:, None, None].expand_as(table))
    report = json.loads((out / "adaptivity.json").read_text())
    assert report["static"]["search_speedup"] == pytest.approx(report["adaptive"]["search_speedup"])
    assert report["cells_varying"] == 0
    with pytest.raises(ValueError, match="exists"):  # nothing overwritten
        script.main(["--policy", "fora:interval=2", "--model", str(tiny_dit_dir), "--steps", "7", "--out", str(out)])


def test_a_per_sample_policy_gets_a_static_table_at_its_mean_macs(tiny_dit_dir, tmp_path):
    script = load_script("adaptivity_ablation", "benchmarks/research")
    out = tmp_path / "ab"
    assert script.main(["--policy", "teacache:threshold=0.3", "--model", str(tiny_dit_dir), "--steps", "8",
                        "--samples", "4", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads((out / "adaptivity.json").read_text())
    adaptive, static = report["adaptive"]["search_speedup"], report["static"]["search_speedup"]
    assert adaptive > 1 and abs(static - adaptive) / adaptive < 0.1  # within one cell's MACs of it
