"""Learned forecasting (L2P-style): a per-cell linear predictor fitted in closed form on a static schedule."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import Policy
from cqpolicy.sampling import SampleSettings
from cqpolicy.training.forecast import ScheduleError, fit_forecast

STEPS = 8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import mlflow_store_at, save_with_scheduler, tiny_fmnist_dit

    root = tmp_path_factory.mktemp("forecast")
    model_dir = save_with_scheduler(tiny_fmnist_dit(), root / "tiny-dit")
    with mlflow_store_at(root):
        meta = fit_forecast(str(model_dir), "fora:interval=3", root / "fc", steps=STEPS, samples=4, val_samples=2,
                            batch_size=2, progress=False)
    return model_dir, root / "fc", meta


def _images(model, spec, steps=STEPS):
    from cqpolicy.evaluation.cost import measured_sample

    policy = make_policy(spec)
    settings = SampleSettings(steps=steps, guidance_scale=2.0, batch_size=2)
    policy.prepare(model, settings)
    return measured_sample(model, policy, "fp16", [1, 2], [7, 8], settings)


def test_the_fit_records_the_schedule_and_beats_plain_reuse_on_its_seeds(fitted):
    model_dir, path, meta = fitted
    tensors = load_file(path / "weights.safetensors")
    table = tensors["table"].bool()
    assert table[:, 0, 0].tolist() == [s % 3 == 0 for s in range(STEPS)]  # FORA-3 as it ran
    assert bool((table == table[:, :1, :1]).all())
    assert meta["metrics"]["reused_cells"] == int((~table).sum())
    # cells with one computed output so far have one weight; the fit leaves less error than plain reuse
    assert tensors["weights"][1, 0, 0, 1:].abs().sum() == 0
    assert meta["metrics"]["val_error_vs_reuse"] < 1.0
    assert meta["training"]["calibration_seeds"][0] == 10_000_000
    assert meta["training"]["sampled_images"] == 2 * 4 + 2 * 2 and meta["training"]["cpu_s"] > 0  # its cost, recorded


def test_forecast_runs_the_schedule_and_forecasts_the_reused_cells(fitted):
    model_dir, path, _ = fitted
    model = load_model(str(model_dir))
    fora = _images(model, "fora:interval=3")
    forecast = _images(model, f"forecast:path={path}")
    # the same cells computed, plus the forecast's own multiply-adds: K newest outputs per reused element, with
    # K = min(order 3, outputs computed so far); FORA-3 over 8 steps computes steps 0, 3, 6
    rows, tokens, width = 2 * 2, (28 // 4) ** 2, 16  # 2 samples x CFG, 7 x 7 patches, 2 heads x 8
    history = [min(3, (s + 2) // 3) for s in range(STEPS) if s % 3]
    assert forecast.macs - fora.macs == 2 * 2 * sum(history) * rows * tokens * width  # 2 blocks x (attn1, ff)
    assert make_policy(f"forecast:path={path}").calibration_images == 2 * 4 + 2 * 2  # its fit sampled these
    assert not torch.allclose(forecast.images, fora.images)  # but the reused ones were forecast
    assert forecast.cache_bytes > fora.cache_bytes  # its history is counted


def test_unit_weights_on_the_newest_output_are_plain_reuse(fitted, tmp_path):
    import json
    import shutil

    from cqpolicy.policies.artifact import save_artifact

    model_dir, path, _ = fitted
    tensors = load_file(path / "weights.safetensors")
    weights = torch.zeros_like(tensors["weights"])
    weights[..., 0] = 1.0
    meta = json.loads((path / "policy.json").read_text())
    save_artifact(tmp_path / "reuse", meta, {"table": tensors["table"], "weights": weights})
    model = load_model(str(model_dir))
    assert torch.equal(_images(model, f"forecast:path={tmp_path / 'reuse'}").images,
                       _images(model, "fora:interval=3").images)
    shutil.rmtree(tmp_path / "reuse")


class _PerSample(Policy):
    """Reuses for the first row only: a per-sample (input-dependent) decision."""

    def decide(self, query):
        mask = torch.ones(query.inputs.shape[0], dtype=torch.bool)
        mask[0] = query.step % 2 == 0
        return mask


def test_bad_inputs_are_one_line_errors(fitted, tmp_path, monkeypatch):
    import cqpolicy.policies
    from cqpolicy.policies.artifact import ArtifactError

    model_dir, path, _ = fitted
    model = load_model(str(model_dir))
    for verify in ("", ",verify=0.2"):  # a forecast (or a verifying one) for another schedule length
        with pytest.raises(ArtifactError, match="step count"):
            make_policy(f"forecast:path={path}{verify}").prepare(model, SampleSettings(steps=STEPS + 2,
                                                                                      guidance_scale=2.0))
    with pytest.raises(ValueError, match="check 'layer' names units the artifact does not forecast"):
        make_policy(f"forecast:path={path},verify=0.2,check=layer")
    with pytest.raises(ValueError, match="verify must be a non-negative"):
        make_policy(f"forecast:path={path},verify=-1")
    with pytest.raises(ArtifactError, match="block count"):  # another model
        make_policy(f"forecast:path={path}").prepare(load_model("fmnist-dit"),
                                                     SampleSettings(steps=STEPS, guidance_scale=2.0))
    with monkeypatch.context() as patch:
        patch.setattr(cqpolicy.policies, "make_policy", lambda spec: _PerSample())
        with pytest.raises(ScheduleError, match="decides per sample"):
            fit_forecast(str(model_dir), "per-sample", tmp_path / "t", steps=STEPS, samples=2, val_samples=2,
                         progress=False)
    with pytest.raises(ScheduleError, match="nothing to forecast"):
        fit_forecast(str(model_dir), "none", tmp_path / "n", steps=STEPS, samples=2, val_samples=2, progress=False)
    assert not (tmp_path / "t").exists() and not (tmp_path / "n").exists()


def test_forecast_fits_and_deploys_on_a_unet(tiny_unet_dir, tmp_path):
    meta = fit_forecast(str(tiny_unet_dir), "fora:interval=2,unit=layer", tmp_path / "fc", steps=STEPS, samples=2,
                        val_samples=2, batch_size=2, progress=False)
    assert meta["model"]["units"] == ["layer"] and meta["metrics"]["val_error_vs_reuse"] < 1.0
    model = load_model(str(tiny_unet_dir))
    forecast = _images(model, f"forecast:path={tmp_path / 'fc'}")
    fora = _images(model, "fora:interval=2,unit=layer")
    assert forecast.macs > fora.macs and not torch.equal(forecast.images, fora.images)  # + its own arithmetic


def test_on_policy_rounds_follow_the_deployed_forecast_and_refit_on_its_states(fitted, tmp_path):
    from conftest import mlflow_store_at

    from cqpolicy.evaluation.cost import measured_sample
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample
    from cqpolicy.training.forecast import _NormalEquations

    model_dir, path, _ = fitted
    model = load_model(str(model_dir))
    tensors = load_file(path / "weights.safetensors")
    meta = __import__("json").loads((path / "policy.json").read_text())
    settings = SampleSettings(steps=STEPS, guidance_scale=2.0, batch_size=2)
    # a run under the accumulator is the deployed forecast's run (both keep fp32 outputs)
    accumulator = _NormalEquations(tuple(meta["model"]["units"]), tensors["table"].bool(), meta["order"],
                                   tensors["weights"])
    with enable(model.transformer, accumulator, cache_format="fp32"):
        followed = sample(model, [1, 2], [7, 8], settings, progress=False)
    policy = make_policy(f"forecast:path={path}")
    policy.prepare(model, settings)
    deployed = measured_sample(model, policy, "fp32", [1, 2], [7, 8], settings)
    assert torch.allclose(followed, deployed.images, atol=1e-5)
    # it collected one label per reused cell, and the forecast beats reuse on its own trajectory
    assert bool((accumulator.count[~tensors["table"].bool()] > 0).all())
    assert 0 < accumulator.errors["forecast"] < accumulator.errors["reuse"]

    with mlflow_store_at(tmp_path):
        refit = fit_forecast(str(model_dir), "fora:interval=3", tmp_path / "dagger", steps=STEPS, samples=4,
                             val_samples=2, batch_size=2, on_policy_rounds=2, progress=False)
    assert len(refit["training"]["round_errors_vs_reuse"]) == 2
    assert refit["training"]["sampled_images"] == 4 * 4 + 2 * 2
    assert 0 < refit["metrics"]["val_onpolicy_error_vs_reuse"] < 1.0
    with pytest.raises(ValueError, match="on_policy_rounds"):
        fit_forecast(str(model_dir), "fora:interval=3", tmp_path / "bad", steps=STEPS, on_policy_rounds=-1)
    assert not (tmp_path / "bad").exists()


def test_the_affine_fit_is_the_least_squares_fit_whose_weights_sum_to_one():
    from cqpolicy.training.forecast import _NormalEquations, _solve

    torch.manual_seed(0)
    table = torch.tensor([True, True, True, False]).reshape(4, 1, 1)
    acc = _NormalEquations(("ff",), table, order=3)
    h = torch.randn(3, 500, dtype=torch.float64)  # newest first
    cell = (3, 0, 0)
    for y in (2 * h[0] - h[1] + 0.01 * torch.randn(500, dtype=torch.float64), 0.9 * h[0]):
        acc.gram[cell], acc.cross[cell], acc.count[cell] = h @ h.T, h @ y, 3
        free, affine = (_solve(acc, table, ridge=0.0, affine=a)[cell].double() for a in (False, True))
        assert float(affine.sum()) == pytest.approx(1.0, abs=1e-6)
        # affine is the constrained minimiser: no weights summing to 1 along a feasible direction do better
        loss = lambda w: float(((h.T @ w) - y).pow(2).sum())  # noqa: E731
        for direction in (torch.tensor([1.0, -1, 0]), torch.tensor([0.0, 1, -1]), torch.tensor([1.0, 0, -1])):
            assert loss(affine) <= loss(affine + 1e-3 * direction.double()) + 1e-9
        assert loss(free) <= loss(affine) + 1e-9
    assert torch.allclose(free, torch.tensor([0.9, 0, 0], dtype=torch.float64), atol=1e-6)  # the free fit shrinks
    # with near-orthogonal inputs the constrained optimum spreads the missing 0.1 evenly: [0.9 + 0.1/3, 0.1/3, 0.1/3]
    assert torch.allclose(affine, torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], dtype=torch.float64), atol=0.02)


def test_per_channel_fit_scales_and_shifts_each_channel_of_the_cached_output(fitted, tiny_unet_dir, tmp_path):
    import json

    from conftest import mlflow_store_at

    from cqpolicy.policies.artifact import ArtifactError, save_artifact
    from cqpolicy.policies.families.forecast import forecast_by_channel

    h = torch.randn(2, 3, 4, 4)  # a UNet layer's [B, C, H, W]: channels on dim 1
    w = torch.tensor([[2.0, 1.0], [1.0, 0.0], [0.5, -1.0]])
    expected = h * w[:, 0].reshape(1, 3, 1, 1) + w[:, 1].reshape(1, 3, 1, 1)
    assert torch.allclose(forecast_by_channel(w, [h], 1, 1), expected)
    assert torch.allclose(forecast_by_channel(w, [h.movedim(1, -1)], -1, 1), expected.movedim(1, -1))

    model_dir, _, _ = fitted
    with mlflow_store_at(tmp_path):
        meta = fit_forecast(str(model_dir), "fora:interval=3", tmp_path / "dec", steps=STEPS, samples=4,
                            val_samples=2, batch_size=2, order=1, per_channel=True, progress=False)
    tensors = load_file(tmp_path / "dec" / "weights.safetensors")
    model = load_model(str(model_dir))
    channels = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    assert tensors["channel.0.attn1"].shape == (STEPS, channels, 2) and meta["channel_dim"] == -1
    assert bool((tensors["channel.0.ff"][::3] == torch.tensor([1.0, 0.0])).all())  # computed steps: untouched
    assert not torch.equal(tensors["channel.0.ff"][1], tensors["channel.0.ff"][1, :1].expand(channels, 2))
    assert meta["metrics"]["val_error_vs_reuse"] < 1.0
    dec, fora = _images(model, f"forecast:path={tmp_path / 'dec'}"), _images(model, "fora:interval=3")
    # a scale and a shift per reused element: 5 reused steps x 2 blocks x 2 units x 4 rows x 49 tokens x 16 wide
    assert dec.macs - fora.macs == 2 * 5 * 2 * 2 * 4 * 49 * 16 and not torch.allclose(dec.images, fora.images)

    bad = {**tensors, "channel.0.ff": tensors["channel.0.ff"][:, :, :1]}  # no bias column
    save_artifact(tmp_path / "bad", json.loads((tmp_path / "dec" / "policy.json").read_text()), bad)
    with pytest.raises(ArtifactError, match="per-channel weights 'channel.0.ff'"):
        make_policy(f"forecast:path={tmp_path / 'bad'}")
    with pytest.raises(ValueError, match="do not combine"):
        fit_forecast(str(model_dir), "fora:interval=3", tmp_path / "x", steps=STEPS, samples=2, val_samples=2,
                     per_channel=True, affine=True, progress=False)
    assert not (tmp_path / "x").exists()
    unet = fit_forecast(str(tiny_unet_dir), "fora:interval=2,unit=layer", tmp_path / "unet", steps=STEPS, samples=2,
                        val_samples=2, batch_size=2, order=1, per_channel=True, progress=False)
    assert unet["channel_dim"] == 1 and unet["metrics"]["val_error_vs_reuse"] < 1.0
    first = load_file(tmp_path / "unet" / "weights.safetensors")["channel.0.layer"]
    unet_model = load_model(str(tiny_unet_dir))
    assert first.shape[1] == unet_model.transformer.config.block_out_channels[0]
    assert _images(unet_model, f"forecast:path={tmp_path / 'unet'}").macs > \
        _images(unet_model, "fora:interval=2,unit=layer").macs


def test_verify_then_forecast_computes_the_rows_whose_first_block_check_fails(fitted):
    from cqpolicy.evaluation.cost import measured_sample

    model_dir, path, _ = fitted
    model = load_model(str(model_dir))
    plain = _images(model, "none")
    static = _images(model, f"forecast:path={path}")
    # every check fails: every row computes every cell, the plain images; the checks' arithmetic is counted
    strict = _images(model, f"forecast:path={path},verify=1e-9")
    assert torch.equal(strict.images, plain.images) and strict.macs > plain.macs
    # every check holds: the schedule's cells plus the first block at each reused step
    lax = make_policy(f"forecast:path={path},verify=1e9")
    settings = SampleSettings(steps=STEPS, guidance_scale=2.0, batch_size=2)
    loose = measured_sample(model, lax, "fp16", [1, 2], [7, 8], settings)
    assert static.macs < loose.macs < plain.macs and lax.verified_share == 1.0
    assert loose.reuse_ratio < static.reuse_ratio
    # in between: some rows compute, and a verifying run is repeatable
    errors = []
    for threshold in (0.01, 0.03, 0.1, 0.3):
        middle = make_policy(f"forecast:path={path},verify={threshold}")
        run = measured_sample(model, middle, "fp16", [1, 2], [7, 8], settings)
        errors.append((middle.verified_share, run.macs))
    shares = [share for share, _ in errors]
    assert shares == sorted(shares) and [m for _, m in errors] == sorted((m for _, m in errors), reverse=True)
    assert any(0 < share < 1 for share in shares)


def test_rows_that_computed_off_the_schedule_reuse_that_output(fitted):
    """A row that failed its check holds the output it computed until the schedule computes again; the others take
    the forecast."""
    from cqpolicy.policies.base import UnitQuery

    _, path, _ = fitted
    policy = make_policy(f"forecast:path={path},verify=0.5")
    policy.reset(STEPS, 2)
    def query(step, block, unit="attn1"):
        return UnitQuery(step, STEPS, 0.0, block, unit, 2, None, True)
    ones = torch.ones(2, 3)
    for block in (0, 1):
        assert policy.decide(query(0, block)) is True
        policy.observe(query(0, block), ones)
    assert policy.decide(query(1, 0)) is True  # step 1 is reused: the first block checks
    predicted = policy.reuse(query(1, 0), ones)
    policy.observe(query(1, 0), torch.stack([predicted[0], predicted[1] + 9]))  # row 1's forecast is far off
    assert policy.decide(query(1, 1)).tolist() == [False, True]
    policy.observe(query(1, 1), torch.tensor([[5.0, 5, 5], [7, 7, 7]]))  # the runtime merged rows: row 1 computed
    out = policy.reuse(query(2, 1), ones)
    assert torch.equal(out[1], torch.full((3,), 7.0)) and not torch.equal(out[0], torch.full((3,), 5.0))
    assert policy.verified_share == 0.5


def test_the_history_is_held_in_any_cache_format_and_its_bytes_are_counted(fitted):
    model_dir, path, _ = fitted
    model = load_model(str(model_dir))
    runs = {fmt: _images(model, f"forecast:path={path},history={fmt}") for fmt in ("fp32", "fp16", "int8-token")}
    held = {fmt: run.cache_bytes - _images(model, "fora:interval=3").cache_bytes for fmt, run in runs.items()}
    assert held["fp32"] == 2 * held["fp16"] and held["fp16"] > held["int8-token"] > held["fp32"] / 4
    assert torch.equal(runs["fp32"].images, _images(model, f"forecast:path={path}").images)
    for fmt in ("fp16", "int8-token"):  # a lossy history: close to the fp32 one, not equal
        gap = (runs[fmt].images - runs["fp32"].images).abs().max()
        assert 0 < gap < 0.05
    with pytest.raises(ValueError, match="history must be a cache format"):
        make_policy(f"forecast:path={path},history=int3")
