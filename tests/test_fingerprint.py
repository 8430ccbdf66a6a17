"""A learned policy artifact fits the weights it was trained for: the stored weight hash is checked on deploy.

Artifacts are written directly with ``save_artifact`` (an untrained MLP or a random table, with the metadata
``cqpolicy train`` writes) for tiny random DiTs of the same depth that differ only in their weights (seed),
so every test runs in about a second.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import cqpolicy
from conftest import save_with_scheduler, tiny_fmnist_dit
from cqpolicy.cli import main
from cqpolicy.models import LoadedModel, fmnist_dit, load_model
from cqpolicy.models.fingerprint import model_fingerprint, model_fingerprints
from cqpolicy.policies.families.learned import LearnedConfig, LearnedPolicy
from cqpolicy.policies.features import STEP_FEATURES
from cqpolicy.runtime import StepMismatchError
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.policies.artifact import ArtifactError, check_fits, save_artifact, transfers_across_steps
from cqpolicy.policies.networks import ReuseMLP

BLOCKS, STEPS, UNITS = 2, 6, ("attn1", "ff")


def tiny_model(seed: int = 0) -> LoadedModel:
    return LoadedModel(f"tiny-{seed}", tiny_fmnist_dit(BLOCKS, seed), dict(fmnist_dit.SCHEDULER_CONFIG))


def model_meta(model_hash, steps: int = STEPS, scheduler: str = "ddim") -> dict:
    meta = {"class": "DiTTransformer2DModel", "model_id": "tiny-0", "num_blocks": BLOCKS, "units": list(UNITS),
            "steps": steps, "scheduler": scheduler, "guidance_scale": 2.0}
    if model_hash is not None:
        meta["model_hash"] = model_hash
    return meta


def mlp_artifact(path, model_hash, features=STEP_FEATURES, steps: int = STEPS):
    torch.manual_seed(0)
    mlp = ReuseMLP(len(features), 4)
    meta = {"kind": "mlp", "features": list(features), "hidden": 4, "default_threshold": 0.1,
            "normalization": {"mean": [0.0] * len(features), "std": [1.0] * len(features)},
            "model": model_meta(model_hash, steps)}
    save_artifact(path, meta, {f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    return path


def scheduler_artifact(path, model_hash, steps: int = STEPS):
    table = torch.ones(steps, BLOCKS, len(UNITS), dtype=torch.uint8)
    table[1::2, :, 1] = 0  # ff reuses every other step
    meta = {"kind": "scheduler", "features": [], "hidden": 0, "default_threshold": 0.5,
            "normalization": {"mean": [], "std": []}, "model": model_meta(model_hash, steps)}
    save_artifact(path, meta, {"table": table})
    return path


def prepare(path, model, steps: int = STEPS, scheduler: str = "ddim"):
    policy = LearnedPolicy(LearnedConfig(path=str(path)))
    policy.prepare(model, SampleSettings(steps=steps, guidance_scale=2.0, scheduler=scheduler, batch_size=2))
    return policy


def test_hash_is_what_trace_records_and_the_weight_hash_ignores_the_folder(tiny_dit_dir, tmp_path):
    from cqpolicy.tracing.collect import model_fingerprint as trace_hash

    a = load_model(str(tiny_dit_dir))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dit_dir, copy)
    b = load_model(str(copy))
    assert model_fingerprints(a)["weights"] == trace_hash(a)  # what every trace manifest holds
    assert model_fingerprint(a) == model_fingerprint(b)  # same weights, another folder
    other = tiny_model(seed=1)
    assert model_fingerprint(other) != model_fingerprint(tiny_model(seed=0))


def test_hash_is_computed_once_per_loaded_model_and_follows_in_place_changes(monkeypatch):
    import cqpolicy.models.fingerprint as fp

    calls = []
    compute = fp._compute
    monkeypatch.setattr(fp, "_compute", lambda *a: calls.append(1) or compute(*a))
    model = tiny_model()
    first = model_fingerprints(model)
    assert model_fingerprints(model) == first and len(calls) == 1  # cached on the LoadedModel
    with torch.no_grad():
        next(model.transformer.parameters()).add_(1.0)
    assert model_fingerprints(model) != first and len(calls) == 2


@pytest.mark.parametrize("make", [mlp_artifact, scheduler_artifact])
@pytest.mark.parametrize("hash_kind", ["legacy", "weights"])
def test_artifact_for_other_weights_of_the_same_depth_is_refused(tmp_path, make, hash_kind):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    path = make(tmp_path / "artifact", model_fingerprints(a)[hash_kind])
    prepare(path, a)  # the weights it was made for
    with pytest.raises(ArtifactError, match="weight hash") as err:
        prepare(path, b)
    assert len(str(err.value).splitlines()) == 1 and "other weights" in str(err.value)


def test_artifact_without_a_stored_hash_is_refused_with_a_retrain_hint(tmp_path):
    path = mlp_artifact(tmp_path / "old", model_hash=None)
    with pytest.raises(ArtifactError, match=r"records no model weight hash.*retrain"):
        prepare(path, tiny_model())


def test_scheduler_table_is_refused_on_other_steps_or_scheduler(tmp_path):
    model = tiny_model()
    path = scheduler_artifact(tmp_path / "sched", model_fingerprint(model))
    assert not transfers_across_steps(LearnedPolicy(LearnedConfig(path=str(path))).meta)
    with pytest.raises(ArtifactError, match=r"step count; a scheduler table is indexed by step"):
        prepare(path, model, steps=4)
    with pytest.raises(ArtifactError, match=r"mismatch: scheduler"):
        prepare(path, model, scheduler="dpm")
    policy = LearnedPolicy(LearnedConfig(path=str(path)))  # the runtime's own check, without prepare
    with pytest.raises(StepMismatchError):
        policy.reset(4, BLOCKS)


def test_progress_keyed_mlp_runs_at_other_step_counts_and_schedulers(tmp_path):
    model = tiny_model()
    path = mlp_artifact(tmp_path / "mlp", model_fingerprint(model))
    policy = prepare(path, model, steps=4, scheduler="dpm")
    assert policy.transfers
    settings = SampleSettings(steps=4, guidance_scale=2.0, scheduler="dpm", batch_size=2)
    with cqpolicy.enable(model.transformer, policy) as handle:
        out = sample(model, [0, 1], [0, 1], settings, progress=False)
        assert handle.calls > 0 and torch.isfinite(out).all()
    with pytest.raises(ArtifactError, match="weight hash"):  # transferring steps never excuses other weights
        prepare(path, tiny_model(seed=1), steps=4)


def test_mlp_keyed_on_the_step_index_does_not_transfer(tmp_path):
    meta = {"kind": "mlp", "features": ["step", "progress"], "model": model_meta("h")}
    assert not transfers_across_steps(meta)
    check_fits(meta, "DiTTransformer2DModel", BLOCKS, STEPS, "ddim", model_hashes=["h"])
    with pytest.raises(ArtifactError, match="step count; its features are not all keyed on progress"):
        check_fits(meta, "DiTTransformer2DModel", BLOCKS, 4, "ddim", model_hashes=["h"],
                   steps_transfer=transfers_across_steps(meta))
    # such an artifact cannot even be deployed: the runtime computes no step-index feature
    path = mlp_artifact(tmp_path / "step-keyed", "h", features=("step", "progress"))
    with pytest.raises(ArtifactError, match="feature 'step' is not one a deployed policy computes"):
        LearnedPolicy(LearnedConfig(path=str(path)))


def two_model_dirs(tmp_path):
    """Folders of two tiny DiTs of the same depth and other weights."""
    return tuple(save_with_scheduler(tiny_fmnist_dit(BLOCKS, seed), tmp_path / name)
                 for name, seed in (("a", 0), ("b", 1)))


@pytest.mark.parametrize("command", ["sample", "trace"])
def test_cli_refuses_an_artifact_of_other_weights_in_one_line(tmp_path, capsys, command):
    """One line, exit 2, and no output folder: not even a trace manifest."""
    a, b = two_model_dirs(tmp_path)
    path = scheduler_artifact(tmp_path / "sched", model_fingerprint(load_model(str(a))))
    code = main([command, "--model", str(b), "--steps", str(STEPS), "--num-samples", "2",
                 "--policy", f"learned:path={path}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "weight hash" in err[0], err
    assert not (tmp_path / "out").exists()
