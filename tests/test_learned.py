"""Close the loop on the tiny model: trace -> train -> deploy with `learned:path=...`."""
import json

import pytest
import torch

import cqpolicy
from cqpolicy.cli import main
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=6, guidance_scale=2.0)


@pytest.fixture
def artifacts(tiny_dit_dir, tmp_path):
    traces = tmp_path / "traces"
    assert main(["trace", "--model", str(tiny_dit_dir), "--steps", "6", "--num-samples", "6", "--batch-size", "2",
                 "--guidance-scale", "2", "--out", str(traces)]) == 0
    assert main(["train", "--traces", str(traces), "--max-epochs", "3", "--out", str(tmp_path / "mlp")]) == 0
    assert main(["train", "--traces", str(traces), "--kind", "scheduler", "--max-epochs", "3",
                 "--out", str(tmp_path / "sched")]) == 0
    return tmp_path / "mlp", tmp_path / "sched"


def test_learned_policies_deploy_and_their_threshold_matters(tiny_dit_dir, artifacts, capsys):
    mlp, sched = artifacts
    meta = json.loads((mlp / "policy.json").read_text())
    assert meta["kind"] == "mlp" and meta["model"]["steps"] == 6 and 0 <= meta["metrics"]["val_auroc"] <= 1
    model = load_model(str(tiny_dit_dir))
    plain = sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
    ratios = {}
    for threshold in (1e-9, 1e9):
        with cqpolicy.enable(model.transformer, f"learned:path={mlp},threshold={threshold}") as handle:
            out = sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
            ratios[threshold] = handle.reuse_ratio
        if threshold == 1e-9:
            assert torch.equal(out, plain)  # nothing predicted safe: never reuses
    assert ratios[1e-9] == 0 and ratios[1e9] > 0.5
    with cqpolicy.enable(model.transformer, f"learned:path={mlp},threshold=1e9,per_sample=true") as handle:
        sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
        assert handle.reuse_ratio > 0.5
    with cqpolicy.enable(model.transformer, f"learned:path={sched}") as handle:
        sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
        assert 0 < handle.reuse_ratio < 1
    assert json.loads((sched / "schedule.json").read_text())  # exported as a SmoothCache schedule


def test_learned_refuses_other_models_and_tampered_weights(tiny_dit_dir, artifacts, tmp_path, capsys):
    mlp, _ = artifacts
    capsys.readouterr()
    code = main(["sample", "--model", str(tiny_dit_dir), "--steps", "5", "--num-samples", "2",
                 "--policy", f"learned:path={mlp}", "--out", str(tmp_path / "o1")])
    assert code == 2 and "6 steps" in capsys.readouterr().err
    weights = mlp / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code = main(["sample", "--model", str(tiny_dit_dir), "--steps", "6", "--num-samples", "2",
                 "--policy", f"learned:path={mlp}", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tampered" in err[0]
