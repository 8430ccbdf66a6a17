"""Smoke test of scripts/bench_gpu.py on CPU with its tiny model."""
import json
import re

import pytest
import torch

from conftest import load_script

@pytest.fixture(scope="module")
def bench_gpu():
    return load_script("bench_gpu")


def test_tiny_cpu_run_writes_a_row_per_method_and_batch(bench_gpu, tmp_path):
    out = tmp_path / "gpu"
    rows = bench_gpu.main(["--tiny", "--device", "cpu", "--steps", "4", "--repeats", "1", "--batch-sizes", "2",
                           "--out", str(out)])
    table, saved = (out / "bench_gpu.md").read_text(), json.loads((out / "bench_gpu.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows, default=str))
    names = [bench_gpu.PLAIN, "none", "fora:interval=2", "fora:interval=3", "attn1/8 ff/4"]
    assert [(r["batch_size"], r["method"]) for r in rows] == [(2, n) for n in names]
    for r in rows:
        assert len(r["times_s"]) == 1 and all(t > 0 for t in r["times_s"]) and r["median_s"] > 0
        assert f"| {r['batch_size']} | `{r['method']}` |" in table
        if r["method"] == bench_gpu.PLAIN:
            assert r["speedup"] == 1.0 and r["reuse_ratio"] == 0.0
    reuse = {r["method"]: r["reuse_ratio"] for r in rows if r["batch_size"] == 2}
    # the policies really ran: at 4 steps fora-2 and fora-3 compute 2 of 4 steps, the per-unit-type schedule only step 0
    assert reuse == pytest.approx({bench_gpu.PLAIN: 0.0, "none": 0.0, "fora:interval=2": 0.5, "fora:interval=3": 0.5,
                                   "attn1/8 ff/4": 0.75})


# every layout's methods, written out here so that a layout or method dropped from the script fails the test
LAYOUT_METHODS = {
    "dit-xl-2-256": ["none", "fora:interval=2", "fora:interval=3", "attn1/8 ff/4"],
    "pixart-xl-2-512": ["none", "fora:interval=2", "fora:interval=3", "tgate:gate=0.4"],
    "sd3.5-medium": ["none", "fora:interval=2", "fora:interval=3"],
    "flux.1-dev": ["none", "fora:interval=2", "fora:interval=3"],
    "sd-1.5": ["none", "fora:interval=2", "fora:interval=3", "tgate:gate=0.4", "deepcache:interval=3"],
}


def test_every_layout_is_smoke_tested(bench_gpu):
    assert set(bench_gpu.LAYOUTS) == set(LAYOUT_METHODS)


@pytest.mark.parametrize("layout", LAYOUT_METHODS)
def test_tiny_cpu_run_of_each_layout_times_its_methods(bench_gpu, tmp_path, layout):
    bench_gpu.main(["--layout", layout, "--tiny", "--device", "cpu", "--steps", "4", "--repeats", "1",
                    "--batch-sizes", "2", "--out", str(tmp_path)])
    stem = "bench_gpu" if layout == bench_gpu.DEFAULT_LAYOUT else f"bench_gpu_{layout}"
    table, saved = (tmp_path / f"{stem}.md").read_text(), json.loads((tmp_path / f"{stem}.json").read_text())
    assert "| wall speedup |" in table.splitlines()[2]
    methods = [bench_gpu.PLAIN, *LAYOUT_METHODS[layout]]
    assert saved["layout"] == layout and [r["method"] for r in saved["rows"]] == methods
    for r in saved["rows"]:
        assert re.search(rf"^\| 2 \| `{re.escape(r['method'])}` \| [\d.]+ \| [\d.]+× \|", table, re.M), r["method"]
        # at 4 steps every caching method reuses something (T-GATE from step 2, DeepCache steps 1 and 2)
        assert (r["reuse_ratio"] > 0) == (r["method"] not in (bench_gpu.PLAIN, "none")), r["method"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_without_cuda_exits_2_with_one_line(bench_gpu, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--device", "cuda", "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()
