"""Close the loop on the tiny model: trace -> train -> deploy with `learned:path=...`."""
import json
import math

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
    seen = meta["training"]["train_seeds"] + meta["training"]["val_seeds"]  # recorded: the bench checks them
    assert sorted(seen) == list(range(20_000_000, 20_000_006))
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
    from conftest import save_with_scheduler, tiny_fmnist_dit

    mlp, sched = artifacts
    capsys.readouterr()
    # a scheduler table is indexed by step: another step count is refused (the MLP, keyed on progress, is not)
    code = main(["sample", "--model", str(tiny_dit_dir), "--steps", "5", "--num-samples", "2",
                 "--policy", f"learned:path={sched}", "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "6 steps" in err[0] and "indexed by step" in err[0]
    # another model of the same depth (other weights): refused on its weight hash
    other = save_with_scheduler(tiny_fmnist_dit(seed=1), tmp_path / "other-dit")
    for artifact in (mlp, sched):
        code = main(["sample", "--model", str(other), "--steps", "6", "--num-samples", "2",
                     "--policy", f"learned:path={artifact}", "--out", str(tmp_path / "o3")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "weight hash" in err[0], err
    weights = mlp / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code = main(["sample", "--model", str(tiny_dit_dir), "--steps", "6", "--num-samples", "2",
                 "--policy", f"learned:path={mlp}", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tampered" in err[0]


def test_step_level_features_at_run_time_equal_the_ones_trained_on(tiny_dit_dir, artifacts, tmp_path, monkeypatch):
    """Trace under the deployed MLP, then rebuild the training features from that trace: every row must equal
    what the policy fed its MLP at run time (one call per step, all units x rows)."""
    from cqpolicy import seeds as seed_roles
    from cqpolicy.tracing.collect import collect
    from cqpolicy.training.data import TraceDataModule
    from cqpolicy.policies.networks import ReuseMLP

    mlp, _ = artifacts
    meta = json.loads((mlp / "policy.json").read_text())
    seen = []
    forward = ReuseMLP.forward
    monkeypatch.setattr(ReuseMLP, "forward", lambda self, x: seen.append(x.clone()) or forward(self, x))
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=6, guidance_scale=2.0, batch_size=2)
    # every unit predicted safe, the cap makes it compute every third step: stale caches, varied staleness
    collect(model, settings, tmp_path / "under-mlp", num_samples=4,
            policy=f"learned:path={mlp},threshold=1e9,max_reuse=2", progress=False)
    assert len(seen) == 2 * 6 and seen[0].ndim == 3  # 2 batches x 6 steps, one call each
    mean, std = (torch.tensor(meta["normalization"][k]) for k in ("mean", "std"))
    runtime = [x * std + mean for x in seen]  # [blocks x units, rows, features] per step

    dm = TraceDataModule([tmp_path / "under-mlp"], features=meta["features"], val_fraction=0.5)
    units, names = len(dm.units), dm.features
    since = names.index("steps_since_compute")
    checked, stale = 0, 0
    first = seed_roles.start("trace")
    for split in dm.split.values():
        rows = split["x"].double() * torch.tensor(dm.normalization["std"]) + torch.tensor(dm.normalization["mean"])
        for x, seed, step, block, unit in zip(rows, split["seed"], split["step"], split["block"], split["unit"]):
            branch = int(round(x[names.index("cfg_branch")].item()))
            i = int(seed) - first  # sample index: collect's seeds start at the trace role's first seed
            got = runtime[i // 2 * 6 + int(step)][int(block) * units + int(unit), branch * 2 + i % 2]
            assert torch.allclose(got.double(), x, rtol=1e-4, atol=1e-5), (int(seed), int(step), got, x)
            checked += 1
            stale += x[since].item() > 0
    assert checked == 4 * 2 * 5 * 2 * units and stale > 0  # every probed row, some of them after reuses


def test_deploying_a_learned_policy_imports_no_trainer(tiny_dit_dir, artifacts):
    """Imports run one way: sampling under a trained MLP and scheduler loads neither Lightning nor the trainer
    nor the trace reader."""
    import subprocess
    import sys

    mlp, sched = artifacts
    code = f"""
import sys
import cqpolicy
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings, sample
model = load_model({str(tiny_dit_dir)!r})
for path in ({str(mlp)!r}, {str(sched)!r}):
    with cqpolicy.enable(model.transformer, "learned:path=" + path):
        sample(model, [1, 2], [0, 1], SampleSettings(steps=6, guidance_scale=2.0), progress=False)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")
             or m.startswith(("cqpolicy.training", "cqpolicy.tracing")))
print(bad)
sys.exit(1 if bad else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_cumulative_rule_prices_the_whole_chain(tiny_dit_dir, artifacts, monkeypatch):
    """With every step's predicted impact a constant c, reusing while the chain's sum stays under the threshold
    allows floor(threshold / c) reuses in a row: 3.5 c is FORA-4's schedule exactly."""
    from cqpolicy.policies.networks import ReuseMLP

    mlp, sched = artifacts
    c = 0.01
    monkeypatch.setattr(ReuseMLP, "forward", lambda self, x: torch.full((*x.shape[:-1], 1), math.log(c + 1e-6)))
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=9, guidance_scale=2.0)
    with cqpolicy.enable(model.transformer, f"learned:path={mlp},threshold={3.5 * c},cumulative=true") as handle:
        chained = sample(model, [1, 2], [0, 1], settings, progress=False)
        ratio = handle.reuse_ratio
    with cqpolicy.enable(model.transformer, "fora:interval=4"):
        fora = sample(model, [1, 2], [0, 1], settings, progress=False)
    assert torch.equal(chained, fora) and ratio == 6 / 9
    with pytest.raises(ValueError, match="applies to mlp"):
        cqpolicy.enable(model.transformer, f"learned:path={sched},cumulative=true")
