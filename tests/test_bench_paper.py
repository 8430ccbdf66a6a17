"""scripts/bench_paper.py on a tiny model: rows per (replicate, method), resume, the leaderboard's columns."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import load_script

REQUIRED = ["method", "family", "cache_dtype", "macs_speedup", "wall_speedup", "fid_mean", "fid_std", "delta_fid",
            "delta_fid_std", "kid_mean", "kid_std", "num_samples", "seeds"]


def test_paper_bench_resumes_and_writes_the_table(tiny_dit_dir, tmp_path):
    script = load_script("bench_paper")
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_dit_dir), "steps": 4, "batch_size": 4, "num_samples": 4,
                                      "seeds": [0, 1], "methods": ["fora:interval=2", "teacache:threshold=0.3"],
                                      "learned_from": str(tmp_path / "no-run")}))
    out = tmp_path / "paper"
    assert script.main(["--config", str(config), "--out", str(out)]) == 0
    rows = sorted((out / "rows").glob("*/*.json"))
    assert len(rows) == 2 * 3  # 2 replicates x (plain + 2 methods)
    table = pd.read_csv(out / "leaderboard.csv")
    assert set(REQUIRED) <= set(table.columns)
    assert set(table["family"]) == {"plain", "fora", "teacache"}
    assert set(table["seeds"].astype(str)) == {"0 1000000"}
    fora = table[table["method"].str.startswith("fora")].iloc[0]
    assert fora["macs_speedup"] > 1.5 and fora["num_samples"] == 4
    walls = sorted((out / "wall").glob("*.json"))
    assert len(walls) == 2  # timed once per method, not per replicate
    for path in rows:
        row = json.loads(path.read_text())
        assert row["wall_speedup"] > 0
        if row["family"] != "plain":
            assert "interleaved" in row["wall_measured_on"]
    (out / "leaderboard.csv").unlink()
    assert script.main(["--config", str(config), "--out", str(out), "--table-only"]) == 0  # benches nothing
    assert pd.read_csv(out / "leaderboard.csv").equals(table)
    stamp = {p: p.stat().st_mtime_ns for p in rows}
    rows[-1].unlink()  # a lost row is benched again, the others are kept as they were
    assert script.main(["--config", str(config), "--out", str(out)]) == 0
    again = sorted((out / "rows").glob("*/*.json"))
    assert len(again) == 6
    assert all(p.stat().st_mtime_ns == stamp[p] for p in again if p != rows[-1])
    # rows of other weights are never mixed into the table: one line, nothing touched
    from conftest import save_with_scheduler, tiny_fmnist_dit

    other = save_with_scheduler(tiny_fmnist_dit(seed=7), tmp_path / "other-weights")
    config.write_text(config.read_text().replace(str(tiny_dit_dir), str(other)))
    import pytest

    with pytest.raises(script.PaperError, match="other weights"):
        script.main(["--config", str(config), "--out", str(out)])
    assert all(p.stat().st_mtime_ns == stamp[p] for p in again if p != rows[-1])


def test_learned_artifacts_are_frozen_once(tmp_path, request):
    """The learned rows name copies under OUT/policies/, listed for a resumed bench without the run; a run with
    other artifacts is refused."""
    script = load_script("bench_paper")
    run = tmp_path / "run"
    for name in ("train/mlp", "train/scheduler", "train/intervals-0.2"):
        (run / name).mkdir(parents=True)
        (run / name / "policy.json").write_text(name)
    done = {"train": {"mlp": str(run / "train/mlp"), "scheduler": str(run / "train/scheduler"),
                      "intervals": {"0.2": str(run / "train/intervals-0.2")}},
            "search": {"pareto": [{"policy": f"learned:path={run / 'train/mlp'},threshold=0.5,max_reuse=2",
                                   "cache_dtype": "fp16", "macs_speedup": 2.0}]}}
    done["retrain"] = {**done["train"], "retrained": False}
    for stage, result in done.items():
        (run / stage / "done.json").parent.mkdir(parents=True, exist_ok=True)
        (run / stage / "done.json").write_text(json.dumps(result))
    frozen = tmp_path / "paper" / "policies"
    config = str(Path(request.config.rootpath) / "configs" / "fmnist-dit.yaml")
    methods = script.learned_methods(run, config, frozen)
    assert [m[0].split(",")[0] for m in methods] == [f"learned:path={frozen / n}" for n in
                                                     ("train-mlp", "train-scheduler", "train-intervals-0.2")]
    assert "max_reuse=2" in methods[1][0] and "threshold=0.5" in methods[0][0]
    assert (frozen / "train-intervals-0.2" / "policy.json").read_text() == "train/intervals-0.2"
    assert script.learned_methods(tmp_path / "gone", config, frozen) == methods
    (run / "train/mlp/policy.json").write_text("retrained")
    import pytest

    with pytest.raises(script.PaperError, match="another artifact"):
        script.learned_methods(run, config, frozen)


def test_plain_images_and_row_of_different_runs_are_not_paired(tiny_dit_dir, tmp_path):
    """Kept images whose plain row came from elsewhere (a run killed between the two files) are sampled again."""
    script = load_script("bench_paper")
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_dit_dir), "steps": 2, "batch_size": 2, "num_samples": 2,
                                      "seeds": [0], "methods": [], "learned_from": str(tmp_path / "no-run")}))
    out = tmp_path / "paper"
    assert script.main(["--config", str(config), "--out", str(out)]) == 0
    row_file = next((out / "rows" / "0").glob("baseline-*.json"))
    row = json.loads(row_file.read_text())
    assert row["images_sha256"] and script._plain_matches(out / "work" / "plain-0-2.npz", row_file)
    row_file.write_text(json.dumps({**row, "images_sha256": "another run"}))
    assert script.main(["--config", str(config), "--out", str(out)]) == 0
    assert json.loads(row_file.read_text())["images_sha256"] == row["images_sha256"]  # sampled and scored again


def test_a_burst_of_load_gets_more_timing_pairs_and_the_median(tmp_path, monkeypatch):
    script = load_script("bench_paper")
    timings = iter([(51.0, 7.3), (26.2, 5.3), (11.4, 5.4), (11.2, 5.2), (11.3, 5.3)])

    def fake(model, methods, labels, seeds, settings, repeats, warmup):
        plain, method = next(timings)
        return {0: [plain], 1: [method]}

    monkeypatch.setattr(script, "interleaved_walls", fake)
    from cqpolicy.sampling import SampleSettings

    record = script.wall_record(tmp_path / "w.json", None, None, "fp16", [0] * 4, [0] * 4,
                                SampleSettings(batch_size=4), repeats=2)
    assert len(record["plain_s"]) == 4 and record["settled"]  # timed past the burst
    assert record["wall_speedup"] == pytest.approx(11.3 / 5.3)  # the medians of the last 2 pairs
    assert script.wall_record(tmp_path / "w.json", None, None, "fp16", [], [], None, 2) == record  # kept


def _quantized(source_dir, out, method="int8"):
    """``source_dir``'s model quantized into ``out`` (as ``cqpolicy quantize`` does); returns the report."""
    from cqpolicy.models import load_model
    from cqpolicy.quantization import quantize_model, save_quantized

    model = load_model(str(source_dir))
    return save_quantized(model, quantize_model(model, method), out)


def test_weights_entries_are_scored_against_the_full_precision_plain_model(tiny_dit_dir, tmp_path):
    script = load_script("bench_paper")
    report = _quantized(tiny_dit_dir, tmp_path / "q8")
    q8 = str(tmp_path / "q8")
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_dit_dir), "steps": 4, "batch_size": 4, "num_samples": 4,
                                      "seeds": [0, 1], "learned_from": None,
                                      "methods": ["fora:interval=2", {"policy": "none", "weights": q8},
                                                  {"policy": "fora:interval=2", "weights": q8}]}))
    out = tmp_path / "paper"
    assert script.main(["--config", str(config), "--out", str(out)]) == 0
    rows = {(r["seed"], r["policy"], r["weights"]): r
            for r in (json.loads(p.read_text()) for p in (out / "rows").glob("*/*.json"))}
    assert len(rows) == 2 * 4
    digest = script._tree_digest(tmp_path / "q8")
    assert (out / "rows" / "0" / f"{script.slug('fora:interval=2', 'fp16')}.json").is_file()  # fp slug as before
    assert (out / "rows" / "0" / f"{script.slug('fora:interval=2', 'fp16', digest)}.json").is_file()
    assert (out / "rows" / "0" / f"{script.slug('none', 'none', digest)}.json").is_file()
    assert len(list((out / "wall").glob("*.json"))) == 3  # one per method, the weights ones included
    from cqpolicy.models import load_model

    params = sum(t.numel() for t in load_model(str(tiny_dit_dir)).transformer.state_dict().values())
    for seed in (0, 1000000):
        base = rows[(seed, "baseline", "fp")]
        assert base["model_bytes"] == 4 * params and base["compression_ratio"] == 1.0
        assert rows[(seed, "fora:interval=2", "fp")]["model_bytes"] == 4 * params
        weights_only, joint = rows[(seed, "none", "int8")], rows[(seed, "fora:interval=2", "int8")]
        for row in (weights_only, joint):
            assert row["model_bytes"] == report["size_bytes"] < 4 * params / 3
            assert row["compression_ratio"] == pytest.approx(report["compression_ratio"])
            assert row["compression_ratio"] > 3
            assert row["weights_dir"] == q8 and row["weights_digest"] == digest
            assert row["model_fingerprint"] == base["model_fingerprint"] and row["model"] == base["model"]
        # scored against the fp plain images: the quantized model alone is close, not identical, at the fp MACs
        assert not weights_only["bit_identical"] and 20 < weights_only["psnr_vs_baseline"] < float("inf")
        assert weights_only["policy_config"] == "none" and weights_only["family"] == "none"
        assert weights_only["macs_speedup"] == 1.0 and weights_only["cache_dtype"] == "none"
        assert joint["macs_speedup"] == pytest.approx(rows[(seed, "fora:interval=2", "fp")]["macs_speedup"])
    table = pd.read_csv(out / "leaderboard.csv")
    table.index = table["method"].str.split(":").str[0] + "/" + table["weights"]
    assert table["family"].to_dict() == {"baseline/fp": "plain", "fora/fp": "fora", "none/int8": "none+int8",
                                         "fora/int8": "fora+int8"}
    seeds = (0, 1000000)
    expected = sum(rows[(s, "none", "int8")]["fid"] - rows[(s, "baseline", "fp")]["fid"] for s in seeds) / 2
    assert table.loc["none/int8", "delta_fid"] == pytest.approx(expected)  # paired with the fp plain FID
    assert table.loc["none/int8", "model_bytes"] == report["size_bytes"] == table.loc["fora/int8", "model_bytes"]
    assert table.loc["fora/fp", "compression_ratio"] == 1.0
    md = (out / "leaderboard.md").read_text()
    assert "| none+int8 | none | int8 | 1.00× |" in md and "model MiB | compression" in md


def test_weights_from_another_model_are_refused_in_one_line(tiny_dit_dir, tmp_path):
    from conftest import save_with_scheduler, tiny_fmnist_dit

    script = load_script("bench_paper")
    other = save_with_scheduler(tiny_fmnist_dit(seed=7), tmp_path / "other")
    _quantized(other, tmp_path / "q-other")
    config = tmp_path / "paper.yaml"
    data = {"model": str(tiny_dit_dir), "steps": 2, "batch_size": 2, "num_samples": 2, "seeds": [0],
            "learned_from": None, "methods": [{"policy": "none", "weights": str(tmp_path / "q-other")}]}
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "paper"
    with pytest.raises(script.PaperError, match="was quantized from") as info:
        script.main(["--config", str(config), "--out", str(out)])
    assert "\n" not in str(info.value) and not out.exists()
    for bad, message in [({"policy": "none"}, "a methods entry is"),
                         ({"policy": "none", "weights": str(tmp_path / "missing")}, "does not exist")]:
        config.write_text(yaml.safe_dump({**data, "methods": [bad]}))
        with pytest.raises(script.PaperError, match=message):
            script.main(["--config", str(config), "--out", str(out)])


def test_methods_entries_name_a_cache_format():
    script = load_script("bench_paper")
    assert script.config_methods(["fora:interval=3", {"policy": "fora:interval=3", "cache": "int8-token"},
                                  {"policy": "fora:interval=2", "weights": "q", "cache": "int4"}]) == [
        ("fora:interval=3", "fp16", None), ("fora:interval=3", "int8-token", None), ("fora:interval=2", "int4", "q")]
    for bad in [{"policy": "fora:interval=3", "cache": "int3"}, {"policy": "none", "weights": "q", "cache": "fp16"},
                {"policy": "fora:interval=3", "bits": 4}]:
        with pytest.raises(script.PaperError, match="methods entry"):
            script.config_methods([bad])


@pytest.mark.parametrize("name, cached, prefix", [("fmnist-dit-weights", "fora:interval=3", "out/q/dit-"),
                                                   ("fmnist-unet-weights", "deepcache:interval=3,branch=0",
                                                    "out/q/unet-")])
def test_the_shipped_weights_configs_parse(request, name, cached, prefix):
    """configs/fmnist-*-weights.yaml: the fp cached row plus, per quantized folder, the weights alone and cached."""
    script = load_script("bench_paper")
    config = yaml.safe_load((Path(request.config.rootpath) / "configs" / f"{name}.yaml").read_text())
    methods = script.config_methods(config["methods"])
    assert config["learned_from"] is None and config["seeds"] == [0, 1, 2] and config["num_samples"] == 1000
    assert methods[0] == (cached, "fp16", None)
    folders = {m[2] for m in methods[1:]}
    assert len(folders) >= 5 and all(f.startswith(prefix) for f in folders)
    for folder in folders:  # each weights alone, and the 4-bit formats also under the cached row's policy
        assert ("none", "none") in {m[:2] for m in methods if m[2] == folder}
        if folder.endswith(("int8", "int4", "acqe4")):
            assert (cached, "fp16") in {m[:2] for m in methods if m[2] == folder}
