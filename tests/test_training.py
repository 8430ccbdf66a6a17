"""Training stage: seed split, train-only normalisation, a learnable MLP, determinism, resume, artifacts, scheduler.

All data are tiny synthetic trace runs written with ``TraceWriter`` (no diffusion model runs); the label
truly depends on the runtime features (``in_rel_l1_prev``, the same for every unit of a row's step as the
model-input change is, and ``steps_since_compute``) and on where the unit
is, so a model can learn it and a scheduler has cheap and expensive cells to choose between.
"""
from __future__ import annotations

import json
import math
from itertools import product

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from cqpolicy.policies.base import UnitQuery
from cqpolicy.policies.families.learned import LearnedConfig, LearnedPolicy
from cqpolicy.policies.families.schedule import load_schedule
from cqpolicy.policies.features import RUNTIME_FEATURES, STEP_FEATURES
from cqpolicy import seeds as seed_roles
from cqpolicy.tracing import RunInfo, TraceError, TraceReader, TraceWriter

TRACE_SEED0 = seed_roles.start("trace")
from cqpolicy.tracing.collect import LABEL_COLUMNS, TRACE_SCHEMA
from cqpolicy.policies.artifact import ArtifactError, check_fits, load_artifact, save_artifact
from cqpolicy.training.data import TraceDataModule
from cqpolicy.training.modules import LayerSchedulerModule, ReuseMLP, ReusePolicyModule, chain_costs, fit_intervals
from cqpolicy.training.train import checkpoint_dir, train_policy

STEPS, BLOCKS, UNITS = 10, 4, ("attn1", "ff")
FAST = dict(hidden=32, batch_size=64, progress=False)


def info(**over) -> RunInfo:
    kw = dict(model_id="synthetic-dit", model_hash="feedbeef", scheduler="ddim", steps=STEPS, guidance_scale=3.0,
              policy="none", extra={"num_blocks": BLOCKS, "probes": "local"})
    kw.update(over)
    return RunInfo(**kw)


def cell_effect(step, block, unit_is_ff):
    """A fixed per-(step, block, unit) part of the log impact: deep blocks and ff are costly to reuse."""
    return 1.2 * block / (BLOCKS - 1) + 0.6 * unit_is_ff - 0.08 * step


def seed_rows(seed: int, probed: bool = True) -> pa.Table:
    """Rows of sample ``seed`` of the trace role's range (training refuses test seeds)."""
    keys = list(product([TRACE_SEED0 + seed], (0, 1), range(STEPS), range(BLOCKS), UNITS))
    n = len(keys)
    cols = dict(zip(("seed", "cfg_branch", "step", "block", "unit"), map(np.array, zip(*keys))))
    rng = np.random.default_rng(1000 + seed)
    step, block, is_ff = cols["step"], cols["block"], (cols["unit"] == "ff").astype(float)
    data = {name: rng.random(n).astype(np.float32) for name in TRACE_SCHEMA.names[6:]}
    # one input change per (row, step), as a real model's input change reaches every unit: both the per-unit
    # and the step-level (model-input) features see it
    data["in_rel_l1_prev"] = rng.gamma(2.0, 0.1, (2, STEPS))[cols["cfg_branch"], step].astype(np.float32)
    data["steps_since_compute"] = rng.integers(0, 3, n).astype(np.float32)
    data["log_snr"] = (4.0 - step).astype(np.float32)
    log_impact = (-5.0 + 6.0 * data["in_rel_l1_prev"] + 0.9 * data["steps_since_compute"]
                  + cell_effect(step, block, is_ff) + 0.15 * rng.standard_normal(n))
    impact = np.exp(log_impact).astype(np.float32)
    impact[(step == 0) | (not probed)] = np.nan  # step 0 is never probed
    data["impact_local"] = impact
    for name in LABEL_COLUMNS[1:]:
        data[name] = np.full(n, np.nan, np.float32)
    return pa.table({"seed": cols["seed"].astype(np.int64), "cfg_branch": cols["cfg_branch"].astype(np.int8),
                     "step": step.astype(np.int16), "block": block.astype(np.int16), "unit": cols["unit"].tolist(),
                     "class_label": np.full(n, seed % 10, np.int16), **data}, schema=TRACE_SCHEMA)


def make_run(path, seeds, probed: bool = True, **over):
    w = TraceWriter(path, info(**over), TRACE_SCHEMA, label_columns=LABEL_COLUMNS)
    for s in seeds:
        w.write_shard(seed_rows(s, probed))
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, module_mlflow_db):
    """Overrides conftest's per-test store with the module's (still never the project's mlruns/)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_db)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six seeds in two runs of the same model (a run folder per collection job)."""
    root = tmp_path_factory.mktemp("traces")
    return [str(make_run(root / "a", [0, 1, 2])), str(make_run(root / "b", [3, 4, 5]))]


# ------------------------------------------------------------------------------------------------ data

def test_training_refuses_traces_of_test_seeds(tmp_path):
    """A trace of the bench's samples (test seeds) must never train a policy."""
    w = TraceWriter(tmp_path / "t", info(), TRACE_SCHEMA, label_columns=LABEL_COLUMNS)
    for seed in (0, 1):  # samples of test replicate 0
        rows = seed_rows(seed)
        w.write_shard(rows.set_column(0, "seed", pa.array([seed] * rows.num_rows, pa.int64())))
    with pytest.raises(TraceError, match="test seeds"):
        TraceDataModule([str(tmp_path / "t")], batch_size=64, seed=0)


def test_datamodule_splits_by_seed_and_normalises_on_train_only(runs):
    dm = TraceDataModule(runs, batch_size=64, seed=0)
    train, val = dm.split["train"], dm.split["val"]
    assert len(dm.val_seeds) == 2 and len(dm.train_seeds) == 4  # ceil(0.25 * 6)
    assert not set(dm.train_seeds) & set(dm.val_seeds) and sorted(dm.train_seeds + dm.val_seeds) == list(range(TRACE_SEED0, TRACE_SEED0 + 6))
    assert set(train["seed"].tolist()) == set(dm.train_seeds) and set(val["seed"].tolist()) == set(dm.val_seeds)
    assert dm.units == ["attn1", "ff"] and dm.features == list(STEP_FEATURES)
    assert (train["step"] > 0).all() and (val["step"] > 0).all()  # unprobed step-0 rows dropped
    assert len(train["y"]) == 4 * 2 * (STEPS - 1) * BLOCKS * len(UNITS)
    assert torch.allclose(train["y"], torch.log(train["impact"].double() + 1e-6).float())

    # normalisation: the train split's own statistics, recomputed here from the raw trace table
    t = TraceReader(runs).table()
    keep = pc.and_(pc.is_in(t["seed"], pa.array(dm.train_seeds, pa.int64())), pc.greater(t["step"], 0))
    raw = t.filter(keep)["in_rel_l1_prev"].to_numpy().astype(np.float64)
    i = dm.features.index("model_in_rel_l1_prev")  # block 0's attn1 input change (the same on every unit here)
    assert dm.normalization["mean"][i] == pytest.approx(raw.mean(), rel=1e-6)
    assert dm.normalization["std"][i] == pytest.approx(raw.std(), rel=1e-6)
    j = dm.features.index("progress")  # derived: step / (steps - 1)
    steps = t.filter(keep)["step"].to_numpy() / (STEPS - 1)
    assert dm.normalization["mean"][j] == pytest.approx(steps.mean(), rel=1e-6)
    every = t.filter(pc.greater(t["step"], 0))["in_rel_l1_prev"].to_numpy().astype(np.float64)
    assert abs(every.mean() - raw.mean()) > 1e-4  # all-rows statistics differ: val rows did not leak in
    assert min(dm.normalization["std"]) >= 1e-6  # constant features (is_block) are clamped, not divided by 0
    low, high = (torch.tensor(v) for v in dm.input_range)  # the normalised train range the MLP clamps to
    assert torch.equal(low, train["x"].min(0).values) and torch.equal(high, train["x"].max(0).values)
    b = dm.features.index("is_block")
    assert low[b] == high[b] == 0
    module = ReusePolicyModule(dm.in_features, input_range=dm.input_range)
    odd = train["x"][:3].clone()
    odd[:, b] = 1e6  # a constant-in-training feature that varies at run time is held at its training value
    assert torch.equal(module(odd), module(train["x"][:3]))
    assert torch.allclose(train["x"][:, i].mean(), torch.tensor(0.0), atol=1e-4)

    table = dm.impact_table()
    assert table.shape == (STEPS, BLOCKS, 2) and torch.isnan(table[0]).all() and not torch.isnan(table[1:]).any()
    cell = (train["step"] == 3) & (train["block"] == 2) & (train["unit"] == 1)
    assert table[3, 2, 1].item() == pytest.approx(train["impact"][cell].double().mean().item(), rel=1e-5)

    a = next(iter(dm.train_dataloader()))[0]
    b = next(iter(TraceDataModule(runs, batch_size=64, seed=0).train_dataloader()))[0]
    assert torch.equal(a, b) and not torch.equal(a, train["x"][:64])  # shuffled, reproducibly
    assert torch.equal(next(iter(dm.val_dataloader()))[0], val["x"][:64])  # validation is not shuffled
    assert TraceDataModule(runs, seed=1).val_seeds != dm.val_seeds or TraceDataModule(runs, seed=2).val_seeds \
        != dm.val_seeds


def test_model_input_features_are_read_at_block_0_and_accumulated_since_the_last_compute(runs):
    dm = TraceDataModule(runs, batch_size=64, seed=0, val_fraction=0.5)
    t = TraceReader(runs).table().to_pandas()
    first = t[(t.block == 0) & (t.unit == "attn1")].set_index(["seed", "cfg_branch", "step"])
    s = dm.split["train"]
    i = {name: dm.features.index(name) for name in ("model_in_l1", "model_in_rel_l1_acc", "steps_since_compute")}
    mean, std = (np.asarray(dm.normalization[k]) for k in ("mean", "std"))
    raw = s["x"].double().numpy() * std + mean
    branch = (raw[:, dm.features.index("cfg_branch")]).round().astype(int)
    for r in range(0, len(raw), 97):  # every 97th row: a spread of steps, blocks, units and seeds
        seed, step = int(s["seed"][r]), int(s["step"][r])
        assert raw[r, i["model_in_l1"]] == pytest.approx(first.loc[(seed, branch[r], step), "in_l1"], rel=1e-5)
        since = int(round(raw[r, i["steps_since_compute"]]))
        changes = [first.loc[(seed, branch[r], j), "in_rel_l1_prev"] for j in range(max(0, step - since), step + 1)]
        assert raw[r, i["model_in_rel_l1_acc"]] == pytest.approx(sum(changes), rel=1e-4)


def test_chain_rows_price_each_staleness_with_its_own_label_and_features(tmp_path, tiny_dit_dir, runs):
    from cqpolicy.models import load_model
    from cqpolicy.sampling import SampleSettings
    from cqpolicy.tracing.collect import collect

    steps = 6
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=steps, guidance_scale=1.0, batch_size=2)  # no CFG: one row per sample
    collect(model, settings, tmp_path / "chain", num_samples=4, probes=("chain",), progress=False)
    plain = TraceDataModule([tmp_path / "chain"], val_fraction=0.5, label="local")
    dm = TraceDataModule([tmp_path / "chain"], val_fraction=0.5, label="local", chain=True)
    table = TraceReader([tmp_path / "chain"]).table()
    chain_labels = {s: table[f"impact_stale_{s}"].to_numpy(zero_copy_only=False) for s in range(2, 9)}
    assert all(np.isnan(chain_labels[s]).all() for s in range(steps, 9))  # no step - s in a run of 6 steps
    cells = 2 * 2 * 4  # blocks x units x samples
    assert {k: len(v["y"]) for k, v in dm.split.items()} != {k: len(v["y"]) for k, v in plain.split.items()}
    assert sum(len(v["y"]) for v in dm.split.values()) == cells * sum(steps - s for s in range(1, steps))
    assert dm.train_seeds == plain.train_seeds and dm.tolerance() == plain.tolerance()  # tolerance: fresh caches

    names = dm.features
    mean, std = np.array(dm.normalization["mean"]), np.array(dm.normalization["std"])
    for split in dm.split.values():
        raw = split["x"].double().numpy() * std + mean
        since = np.round(raw[:, names.index("steps_since_compute")]).astype(int)
        acc = raw[:, names.index("model_in_rel_l1_acc")]
        change = raw[:, names.index("model_in_rel_l1_prev")]
        step, seed = split["step"].numpy(), split["seed"].numpy()
        fresh = since == 0
        per_step = {(int(a), int(b)): float(c) for a, b, c in zip(seed[fresh], step[fresh], change[fresh])}
        for i in np.flatnonzero(~fresh):  # the model input's change summed over the s steps since the cache
            s, t = since[i] + 1, int(step[i])
            assert acc[i] == pytest.approx(sum(per_step[int(seed[i]), j] for j in range(t - s + 1, t + 1)), rel=1e-4)
        for s in range(2, steps):  # each staleness keeps its own label
            want = chain_labels[s][np.isin(table["seed"].to_numpy(), seed)]
            np.testing.assert_allclose(np.sort(split["impact"].numpy()[since == s - 1]),
                                       np.sort(want[np.isfinite(want)]), rtol=1e-6)
    with pytest.raises(TraceError, match="--probes chain"):  # traces without chain labels
        TraceDataModule(runs, chain=True)
    with pytest.raises(TraceError, match="depends on how stale"):
        TraceDataModule([tmp_path / "chain"], features=RUNTIME_FEATURES, chain=True)


def test_bad_trace_folders_refused(tmp_path, runs):
    with pytest.raises(TraceError, match="no trace folders"):
        TraceDataModule([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="is not a trace run"):
        TraceDataModule([tmp_path / "empty"])
    one = make_run(tmp_path / "one", [7])
    with pytest.raises(TraceError, match="need at least 2 seeds to split"):
        TraceDataModule([one])
    unprobed = make_run(tmp_path / "unprobed", [0, 1], probed=False)
    with pytest.raises(TraceError, match="no probed rows"):
        TraceDataModule([unprobed])
    with pytest.raises(TraceError, match="features missing from the traces: nope"):
        TraceDataModule(runs, features=["in_l1", "nope"])
    other = make_run(tmp_path / "other", [8, 9], model_hash="0ther")
    with pytest.raises(TraceError, match="different model_hash"):
        TraceDataModule([runs[0], other])
    for bad in (one, unprobed):  # and train_policy says the same before building anything
        with pytest.raises(TraceError):
            train_policy([bad], out_dir=tmp_path / "p", **FAST)
    assert not (tmp_path / "p").exists() and not checkpoint_dir(tmp_path / "p").exists()


def with_downstream(table: pa.Table, coefficients, probes_per_seed: int = 6) -> pa.Table:
    """Give ``probes_per_seed`` conditional rows of each seed a downstream change = local x exp(poly(progress))."""
    cols = table.to_pydict()
    rng = np.random.default_rng(7 + cols["seed"][0])
    local = np.asarray(cols["impact_local"], dtype=np.float64)
    down = np.full(len(local), np.nan)
    for seed in set(cols["seed"]):
        rows = [i for i, (s, b, st) in enumerate(zip(cols["seed"], cols["cfg_branch"], cols["step"]))
                if s == seed and b == 0 and st > 0]
        for i in rng.choice(rows, probes_per_seed, replace=False):
            progress = cols["step"][i] / (STEPS - 1)
            down[i] = local[i] * np.exp(np.polyval(coefficients, progress) + 0.01 * rng.standard_normal())
    cols["downstream_rel"] = down.astype(np.float32)
    return pa.table(cols, schema=TRACE_SCHEMA)


def test_downstream_label_weights_local_impact_by_a_fitted_step_weight(tmp_path, runs):
    truth = [-1.5, 0.4, -0.1]  # log(downstream / local) = -1.5 p^2 + 0.4 p - 0.1
    w = TraceWriter(tmp_path / "d", info(extra={"num_blocks": BLOCKS, "probes": "local,downstream"}), TRACE_SCHEMA,
                    label_columns=LABEL_COLUMNS)
    for s in range(6):
        w.write_shard(with_downstream(seed_rows(s), truth))
    auto = TraceDataModule([tmp_path / "d"], batch_size=64, seed=0)
    local = TraceDataModule([tmp_path / "d"], batch_size=64, seed=0, label="local")
    assert auto.label_info["kind"] == "downstream" and auto.label_info["probes"] == 36
    assert np.allclose(auto.label_info["coefficients"], truth, atol=0.05)
    assert local.label_info == {"kind": "local"}
    progress = auto.split["train"]["step"].double() / (STEPS - 1)
    weight = torch.exp(-1.5 * progress ** 2 + 0.4 * progress - 0.1)
    torch.testing.assert_close(auto.split["train"]["impact"].double(), local.split["train"]["impact"].double() * weight,
                               rtol=0.02, atol=0)
    # the weighted label ranks reuses like the measured downstream change does (the synthetic truth is exact)
    assert auto.label_info["spearman_weighted_vs_downstream"] > 0.99
    assert auto.label_info["spearman_weighted_vs_downstream"] >= auto.label_info["spearman_local_vs_downstream"]

    # runs without downstream probes: auto falls back to the local label; asking for downstream is refused
    assert TraceDataModule(runs, batch_size=64).label_info == {"kind": "local"}
    with pytest.raises(TraceError, match="downstream probes: at least 8"):
        TraceDataModule(runs, batch_size=64, label="downstream")
    with pytest.raises(TraceError, match="unknown label"):
        TraceDataModule(runs, label="global")
    meta = train_policy([tmp_path / "d"], out_dir=tmp_path / "p", max_epochs=1, **FAST)
    assert meta["label"]["kind"] == "downstream" and meta["metrics"]["probes"] == 36


# ------------------------------------------------------------------------------------------------- MLP

def query(**over) -> UnitQuery:
    kw = dict(step=3, num_steps=STEPS, timestep=500.0, block=1, unit="ff", num_blocks=BLOCKS,
              inputs=torch.randn(2, 16, 8), has_cache=True, log_snr=1.0, cfg_branch=torch.tensor([0, 1]))
    kw.update(over)
    return UnitQuery(**kw)


def walk_step(policy, step: int, inputs: torch.Tensor) -> dict:
    """The policy's decisions for every unit of one step, in the runtime's order (block 0's attn1 first)."""
    return {(b, u): policy.decide(query(step=step, block=b, unit=u, inputs=inputs))
            for b in range(BLOCKS) for u in UNITS}


def _weights(path):
    return load_artifact(path)[1]


def test_mlp_learns_is_deterministic_and_resumes(tmp_path, runs):
    epochs = 6
    meta = train_policy(runs, out_dir=tmp_path / "a", max_epochs=epochs, seed=0, **FAST)
    m = meta["metrics"]
    assert m["val_auroc"] > 0.8 and m["val_ap"] > 0.7, m
    assert m["val_seeds"] == 2 and m["val_rows"] == 2 * 2 * (STEPS - 1) * BLOCKS * 2
    assert 0.3 < m["val_harmful_rate"] < 0.7  # tolerance = the train median
    assert meta["default_threshold"] == meta["tolerance"] == m["tolerance"]
    assert meta["training"]["epochs_run"] == epochs and meta["training"]["resumed_from_epoch"] is None

    # the artifact is what `learned` deploys: rebuild the MLP exactly as it does and predict
    saved, tensors = load_artifact(tmp_path / "a")
    assert saved == meta and saved["kind"] == "mlp" and saved["model"]["units"] == ["attn1", "ff"]
    assert saved["model"] == {"class": "DiTTransformer2DModel", "model_id": "synthetic-dit",
                              "model_hash": "feedbeef", "num_blocks": BLOCKS, "units": ["attn1", "ff"],
                              "steps": STEPS, "scheduler": "ddim", "guidance_scale": 3.0}
    mlp = ReuseMLP(len(saved["features"]), int(saved["hidden"]))
    mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in tensors.items()})
    assert sum(p.numel() for p in ReuseMLP(len(RUNTIME_FEATURES)).parameters()) < 500_000
    dm = TraceDataModule(runs, seed=0)
    raw = dm.split["val"]["x"].double() * torch.tensor(dm.normalization["std"]) + torch.tensor(dm.normalization["mean"])
    mean, std = (torch.tensor(saved["normalization"][k]) for k in ("mean", "std"))
    with torch.no_grad():
        pred = mlp(((raw - mean) / std).float()).squeeze(1)
    harmful = (dm.split["val"]["impact"] > saved["default_threshold"]).long()
    assert binary_auroc(pred, harmful).item() == pytest.approx(m["val_auroc"], abs=1e-6)
    policy = LearnedPolicy(LearnedConfig(path=str(tmp_path / "a"), per_sample=True))  # the deploying side
    assert policy.step_level  # the default features are all known when a step starts
    policy.reset(STEPS, BLOCKS)
    decision = walk_step(policy, 3, torch.randn(2, 16, 8))[1, "ff"]
    assert decision.dtype == torch.bool and decision.shape == (2,)
    with pytest.raises(RuntimeError, match="must see block 0 first"):  # a step must start where the model does
        policy.decide(query(step=4))
    # a threshold nothing reaches: every row reuses, until max_reuse=1 forces every other step to compute
    lenient = LearnedPolicy(LearnedConfig(path=str(tmp_path / "a"), per_sample=True, threshold=1e9))
    capped = LearnedPolicy(LearnedConfig(path=str(tmp_path / "a"), per_sample=True, threshold=1e9, max_reuse=1))
    for p in (lenient, capped):
        p.reset(STEPS, BLOCKS)
    x = torch.randn(2, 16, 8)
    got = [(walk_step(lenient, s, x + 0.01 * s)[1, "ff"].tolist(),
            walk_step(capped, s, x + 0.01 * s)[1, "ff"].tolist()) for s in range(1, 6)]
    assert [g[0] for g in got] == [[False, False]] * 5
    assert [g[1] for g in got] == [[False, False], [True, True]] * 2 + [[False, False]]
    # per-unit features: every unit call computes its own input features and runs the MLP
    unit = train_policy(runs, out_dir=tmp_path / "unit", max_epochs=1, seed=0, features="unit", **FAST)
    assert unit["features"] == list(RUNTIME_FEATURES)
    per_unit = LearnedPolicy(LearnedConfig(path=str(tmp_path / "unit"), per_sample=True))
    per_unit.reset(STEPS, BLOCKS)
    assert not per_unit.step_level and per_unit.decide(query()).shape == (2,)
    with pytest.raises(ValueError, match="feature set"):
        train_policy(runs, out_dir=tmp_path / "bad", features="token", **FAST)
    with pytest.raises(ValueError, match="max_reuse"):
        LearnedConfig(path="x", max_reuse=-2)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["policy.json", "weights.safetensors"]
    assert (checkpoint_dir(tmp_path / "a") / "last.ckpt").is_file()  # checkpoints live beside the artifact

    # deterministic: same seed, same weights
    train_policy(runs, out_dir=tmp_path / "b", max_epochs=epochs, seed=0, **FAST)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # resume: 3 epochs, then the same call with max_epochs=6 continues from last.ckpt
    first = train_policy(runs, out_dir=tmp_path / "c", max_epochs=epochs // 2, seed=0, **FAST)
    last = checkpoint_dir(tmp_path / "c") / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == epochs // 2 - 1
    with pytest.raises(ArtifactError, match="not empty"):  # an artifact is never replaced by accident
        train_policy(runs, out_dir=tmp_path / "c", max_epochs=epochs, seed=0, **FAST)
    with pytest.raises(ArtifactError, match="other data or settings.*hidden"):
        train_policy(runs, out_dir=tmp_path / "c", max_epochs=epochs, seed=0, overwrite=True,
                     **{**FAST, "hidden": 16})
    again = train_policy(runs, out_dir=tmp_path / "c", max_epochs=epochs, seed=0, overwrite=True, **FAST)
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1
    assert again["training"]["resumed_from_epoch"] == epochs // 2
    assert again["training"]["epochs_run"] == epochs - epochs // 2  # continued, not restarted
    assert again["training"]["mlflow_run_id"] == first["training"]["mlflow_run_id"]
    wc = _weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # an interrupted run ends where an unbroken one does

    import mlflow

    run = mlflow.MlflowClient().get_run(again["training"]["mlflow_run_id"])
    assert run.data.metrics["final_val_auroc"] == pytest.approx(again["metrics"]["val_auroc"])
    assert "val_loss" in run.data.metrics and "train_loss_step" in run.data.metrics


def test_last_checkpoint_is_the_last_epoch_even_when_validation_stops_improving(tmp_path, runs, monkeypatch):
    """A resume continues from the last epoch, not from the best one (ModelCheckpoint's own save_last
    follows its monitor and would keep the last improving epoch)."""
    def worsening(self, batch, batch_idx):
        self.log("val_loss", float(self.current_epoch), on_epoch=True, batch_size=len(batch[0]))

    monkeypatch.setattr(ReusePolicyModule, "validation_step", worsening)
    train_policy(runs, out_dir=tmp_path / "p", max_epochs=3, seed=0, **FAST)
    ckpt = checkpoint_dir(tmp_path / "p")
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["epoch"] == 2
    assert [p.name for p in ckpt.glob("best-*.ckpt")] == ["best-epoch=000.ckpt"]  # the best is still epoch 0


# -------------------------------------------------------------------------------------------- artifact

def _meta(**over):
    meta = {"kind": "mlp", "features": ["in_l1"], "normalization": {"mean": [0.0], "std": [1.0]},
            "target": "log_impact", "tolerance": 0.1, "default_threshold": 0.1, "hidden": 4,
            "model": {"class": "DiTTransformer2DModel", "model_id": "m", "model_hash": "h", "num_blocks": 12,
                      "units": ["attn1", "ff"], "steps": 50, "scheduler": "ddim", "guidance_scale": 4.0},
            "metrics": {"val_auroc": float("nan")}, "traces": ["traces/x"]}
    meta.update(over)
    return meta


def test_artifact_round_trip_refusals_and_fit_check(tmp_path):
    tensors = {"mlp.net.0.weight": torch.randn(4, 1), "mlp.net.0.bias": torch.zeros(4)}
    out = tmp_path / "p"
    written = save_artifact(out, _meta(), tensors)
    meta, got = load_artifact(out)
    assert meta == written and meta["format_version"] == 1 and len(meta["weights_sha256"]) == 64
    assert meta["metrics"]["val_auroc"] is None  # NaN is not JSON: stored as null
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging folder left behind

    with pytest.raises(ArtifactError, match="not empty"):
        save_artifact(out, _meta(), tensors)
    save_artifact(out, _meta(tolerance=0.2), tensors, overwrite=True)
    assert load_artifact(out)[0]["tolerance"] == 0.2 and [p.name for p in tmp_path.iterdir()] == ["p"]

    data = bytearray((out / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01
    (out / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights do not match policy.json \(tampered or partial copy\)"):
        load_artifact(out)
    (out / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="lacks weights.safetensors"):
        load_artifact(out)
    with pytest.raises(ArtifactError, match="no policy.json"):
        load_artifact(tmp_path)
    future = tmp_path / "future"
    save_artifact(future, _meta(), tensors)
    raw = json.loads((future / "policy.json").read_text())
    (future / "policy.json").write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(ArtifactError, match="format_version 2"):
        load_artifact(future)

    check_fits(meta, "DiTTransformer2DModel", 12, 50, "ddim")
    with pytest.raises(ArtifactError, match="trained for 50 steps of ddim on a 12-block DiTTransformer2DModel; "
                                            "this run has 30 steps of ddim.*step count"):
        check_fits(meta, "DiTTransformer2DModel", 12, 30, "ddim")
    with pytest.raises(ArtifactError, match="28-block.*block count"):
        check_fits(meta, "DiTTransformer2DModel", 28, 50, "ddim")
    with pytest.raises(ArtifactError, match="scheduler"):
        check_fits(meta, "DiTTransformer2DModel", 12, 50, "dpm")
    with pytest.raises(ArtifactError, match="model class"):
        check_fits(meta, "PixArtTransformer2DModel", 12, 50, "ddim")


# ------------------------------------------------------------------------------------------- scheduler

@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_scheduler_meets_budget_and_reuses_cheap_cells(budget):
    import lightning as L

    from cqpolicy.training.data import ImpactTableDataModule

    torch.manual_seed(0)
    table = torch.rand(STEPS, BLOCKS, 2).pow(3) * 0.1  # heavy-tailed, like real impacts
    table[0] = math.nan
    module = LayerSchedulerModule(table, compute_budget=budget)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, accelerator="cpu")
    trainer.fit(module, datamodule=ImpactTableDataModule(table, steps_per_epoch=50))
    compute = module.table()
    assert compute.dtype == torch.bool and compute[0].all()
    assert abs(compute.float().mean().item() - budget) <= 0.1
    known = ~torch.isnan(table)
    reused, computed = table[known & ~compute], table[known & compute]
    assert reused.max() <= computed.min() + 1e-6  # it reuses exactly the cheapest cells


def test_train_scheduler_writes_table_and_schedule(tmp_path, runs):
    meta = train_policy(runs, kind="scheduler", out_dir=tmp_path / "s", max_epochs=3, compute_budget=0.5,
                        progress=False)
    m = meta["metrics"]
    assert abs(m["compute_fraction"] - 0.5) <= 0.1
    assert m["train_reused_impact_mean"] < m["train_known_impact_mean"] < m["train_computed_impact_mean"]
    assert m["val_reused_impact_mean"] < m["val_computed_impact_mean"]  # holds on held-out seeds too
    saved, tensors = load_artifact(tmp_path / "s")
    table = tensors["table"]
    assert saved["kind"] == "scheduler" and table.dtype == torch.uint8 and table.shape == (STEPS, BLOCKS, 2)
    assert table[0].all() and abs(table.float().mean().item() - m["compute_fraction"]) < 1e-6
    schedule = load_schedule(tmp_path / "s" / "schedule.json")
    for (unit, block), entries in schedule.items():
        blocks = range(BLOCKS) if block is None else [block]
        for b in blocks:
            own = schedule.get((unit, b), entries)
            assert list(own) == table[:, b, saved["model"]["units"].index(unit)].tolist()
    policy = LearnedPolicy(LearnedConfig(path=str(tmp_path / "s")))
    for step, block, unit in product(range(STEPS), range(BLOCKS), range(2)):
        q = query(step=step, block=block, unit=("attn1", "ff")[unit])
        assert policy.decide(q) == bool(table[step, block, unit])
    # deep blocks and ff are costly in the synthetic data: the table computes them more
    assert table[1:, -1].float().mean() > table[1:, 0].float().mean()

    # max_reuse caps runs of consecutive reuses: the table's own decision unless the cap forces a compute
    for cap in (0, 1, 2):
        capped = LearnedPolicy(LearnedConfig(path=str(tmp_path / "s"), max_reuse=cap))
        capped.reset(STEPS, BLOCKS)
        for block, unit in product(range(BLOCKS), range(2)):
            run = 0
            for step in range(STEPS):
                got = capped.decide(query(step=step, block=block, unit=("attn1", "ff")[unit], has_cache=step > 0))
                want = bool(table[step, block, unit]) or run >= cap or step == 0
                assert got == want, (cap, block, unit, step)
                run = 0 if want else run + 1


# ---------------------------------------------------------------------------- phase-locked intervals

def test_chain_costs_sum_the_one_step_drifts_since_the_last_refresh():
    impact = torch.tensor([math.nan, 1.0, 2.0, 4.0, 8.0, 16.0])[:, None, None]  # [steps, 1 block, 1 unit]
    costs = chain_costs(impact, [1, 2, 4])[:, 0, 0].tolist()
    # k=2 reuses at steps 1, 3, 5 (one step stale): 1 + 4 + 16; k=4 reuses at 1, 2, 3 (1, 2, 3 stale) and 5
    assert costs == [0.0, 1 + 4 + 16, 1 + (1 + 2) + (1 + 2 + 4) + 16]


def test_fit_intervals_refreshes_in_phase_within_budget_and_gives_cheap_units_long_intervals():
    steps, blocks = 48, 4
    impact = torch.full((steps, blocks, 2), 1e-4)
    impact[:, :, 1] = 1e-3  # ff drifts ten times faster than attn1
    impact[0] = math.nan
    for budget in (0.2, 0.3, 0.5):
        table, chosen, lam = fit_intervals(impact, budget)
        assert table.float().mean() <= budget + 1e-9 and lam > 0
        assert table[0].all()  # every unit computes at step 0
        for b, u in product(range(blocks), range(2)):  # unit (b, u) computes exactly every chosen[b, u] steps
            assert table[:, b, u].tolist() == [t % int(chosen[b, u]) == 0 for t in range(steps)]
        assert (chosen[:, 0] >= chosen[:, 1]).all()  # the cheap unit keeps its cache at least as long
    table, chosen, _ = fit_intervals(impact, 0.2)
    assert chosen[:, 0].tolist() == [8] * blocks and chosen[:, 1].tolist() == [4] * blocks
    assert fit_intervals(impact, 1.0)[1].eq(1).all()  # no pressure: compute everything
    with pytest.raises(ValueError, match="divide"):  # 3 and 4 would put refreshes out of phase
        fit_intervals(impact, 0.5, (1, 3, 4))
    with pytest.raises(ValueError, match="below what the longest interval"):
        fit_intervals(impact, 0.05)


def test_train_intervals_writes_a_deployable_scheduler_artifact(tmp_path, runs):
    meta = train_policy(runs, kind="intervals", out_dir=tmp_path / "iv", compute_budget=0.5, intervals=(1, 2, 4))
    m = meta["metrics"]
    saved, tensors = load_artifact(tmp_path / "iv")
    assert saved["kind"] == "scheduler" and saved["fit"] == "intervals" and saved == meta
    table, chosen = tensors["table"].bool(), tensors["intervals"]
    assert table.shape == (STEPS, BLOCKS, 2) and m["compute_fraction"] <= 0.5
    assert m["intervals"] == {"attn1": chosen[:, 0].tolist(), "ff": chosen[:, 1].tolist()}
    dm = TraceDataModule(runs, seed=0)
    assert torch.equal(fit_intervals(dm.impact_table("train"), 0.5, (1, 2, 4))[0], table)  # fit on train seeds only
    assert m["val_chain_cost"] >= 0 and m["val_chain_cost_uniform_1"] == 0
    policy = LearnedPolicy(LearnedConfig(path=str(tmp_path / "iv")))
    policy.reset(STEPS, BLOCKS)
    for step, block, unit in product(range(STEPS), range(BLOCKS), range(2)):
        q = query(step=step, block=block, unit=("attn1", "ff")[unit])
        assert policy.decide(q) == bool(table[step, block, unit])
    with pytest.raises(ArtifactError, match="not empty"):  # nothing is overwritten without overwrite=True
        train_policy(runs, kind="intervals", out_dir=tmp_path / "iv", compute_budget=0.5)
