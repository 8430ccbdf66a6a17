"""The UNet2DModel family on tiny random models: loading, `none` bit-identical, layers as cache units, DeepCache."""
import json

import numpy as np
import pytest
import torch

import cqpolicy
from conftest import tiny_unet
from cqpolicy.cli import main
from cqpolicy.evaluation.cost import count_macs, measured_sample
from cqpolicy.models import fmnist_dit, load_model
from cqpolicy.models.adapters import UNet2DAdapter, adapter_for
from cqpolicy.models.loading import LoadedModel
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import DelegatingPolicy
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=6, guidance_scale=2.0, batch_size=3)


def unet_model(conditional=True):
    return LoadedModel("tiny-unet", tiny_unet(conditional), dict(fmnist_dit.SCHEDULER_CONFIG))


def test_a_unet_folder_loads_with_its_adapter(tiny_unet_dir):
    model = load_model(str(tiny_unet_dir))
    assert isinstance(model.adapter, UNet2DAdapter)
    assert model.latent_shape == (1, 16, 16) and model.num_classes == 10 and model.null_class == 10
    # layers in execution order, each with its level: down 0, down 1, mid (deepest), up 1, up 0
    assert model.adapter.depths(model.transformer) == [0, 1, 1, 2, 2, 2, 1, 1, 1, 1, 0, 0]
    order = []
    for i, layer in enumerate(model.adapter.blocks(model.transformer)):
        layer.register_forward_pre_hook(lambda m, a, i=i: order.append(i))
    sample(model, [0], [0], SampleSettings(steps=1, guidance_scale=1.0, batch_size=1), progress=False)
    assert order == list(range(12))


@pytest.mark.parametrize("conditional, guidance", [(True, 2.0), (True, 1.0), (False, 1.0)])
def test_none_is_bit_identical_to_the_plain_unet(conditional, guidance):
    model = unet_model(conditional)
    settings = SampleSettings(steps=4, guidance_scale=guidance, batch_size=2)
    labels = [1, 2, 3] if conditional else [0, 0, 0]
    plain = sample(model, labels, [0, 1, 2], settings, progress=False)
    with cqpolicy.enable(model.transformer, "none") as handle:
        hooked = sample(model, labels, [0, 1, 2], settings, progress=False)
        assert handle.calls == 2 and len(handle.units) == 12
    assert torch.equal(plain, hooked)


def test_an_unconditional_unet_refuses_guidance_in_one_line():
    model = unet_model(conditional=False)
    assert not model.adapter.conditional(model.transformer) and model.num_classes == 1
    with pytest.raises(ValueError, match="takes no guidance .*no null condition.*: use --guidance-scale 1"):
        sample(model, [0], [0], SampleSettings(steps=2, guidance_scale=2.0), progress=False)


class Watch(DelegatingPolicy):
    def __init__(self, inner):
        super().__init__(inner)
        self.computed = {}

    def decide(self, query):
        decision = super().decide(query)
        self.computed.setdefault(query.step, set())
        if decision and query.has_cache or not query.has_cache:
            self.computed[query.step].add(query.block)
        return decision


@pytest.mark.parametrize("branch", [0, 1])
def test_deepcache_recomputes_the_shallow_path_only_and_its_macs_are_exact(branch):
    model = unet_model()
    depths = model.adapter.depths(model.transformer)
    policy = Watch(make_policy(f"deepcache:interval=3,branch={branch}"))
    run = measured_sample(model, policy, "fp32", [0, 1, 2], [0, 1, 2], SETTINGS)
    shallow = {i for i, d in enumerate(depths) if d <= branch}
    for step, blocks in policy.computed.items():
        assert blocks == (set(range(12)) if step % 3 == 0 else shallow), step
    with cqpolicy.enable(model.transformer, make_policy(f"deepcache:interval=3,branch={branch}"), "fp32"):
        counted, _ = count_macs(lambda: sample(model, [0, 1, 2], [0, 1, 2], SETTINGS, progress=False))
    assert run.macs == counted  # the runtime's row counts x per-layer MACs, against the FLOP counter
    plain = measured_sample(model, None, "none", [0, 1, 2], [0, 1, 2], SETTINGS)
    assert run.macs < plain.macs and not torch.equal(run.images, plain.images)


def test_a_deeper_branch_recomputes_more():
    model = unet_model()
    macs = [measured_sample(model, make_policy(f"deepcache:interval=3,branch={b}"), "fp16", [0], [0], SETTINGS).macs
            for b in (0, 1)]
    assert macs[0] < macs[1]


def test_fora_runs_on_unet_layers_and_dit_units_are_refused():
    model = unet_model()
    run = measured_sample(model, make_policy("fora:interval=2,unit=layer"), "fp16", [0, 1], [0, 1], SETTINGS)
    assert run.reuse_ratio == pytest.approx(0.5, abs=0.01)
    default = measured_sample(model, make_policy("fora:interval=2"), "fp16", [0, 1], [0, 1], SETTINGS)
    assert torch.equal(default.images, run.images)  # no unit named: the adapter's (layer)
    with pytest.raises(ValueError, match=r"unknown cache unit\(s\) \['attn1', 'ff'\] for UNet2DModel"):
        cqpolicy.enable(model.transformer, make_policy("fora:interval=2,unit=attn1+ff"))
    assert adapter_for(model.transformer) is model.adapter and not hasattr(model.transformer, "_cqpolicy_runtime")


@pytest.mark.parametrize("spec, message", [
    ("deepcache:interval=2,branch=2", "branch 2 leaves nothing to reuse"),
    ("deepcache:interval=0", "interval must be at least 1"),
])
def test_bad_deepcache_settings_are_one_line(tiny_unet_dir, tmp_path, capsys, spec, message):
    code = main(["sample", "--model", str(tiny_unet_dir), "--steps", "2", "--num-samples", "1",
                 "--policy", spec, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_deepcache_on_a_dit_is_one_line(tiny_dit_dir, tmp_path, capsys):
    code = main(["sample", "--model", str(tiny_dit_dir), "--steps", "2", "--num-samples", "1",
                 "--policy", "deepcache", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "for DiTTransformer2DModel" in err[0], err


@pytest.mark.parametrize("branch", [0, 1])
def test_deepcache_gives_the_images_of_deepcache_itself(branch):
    """Reference DeepCache: at a refresh step keep the feature the deep path hands the shallow up block (the output
    of the up block below it, or of the mid block); in between, replace that feature by the kept one. Our layer
    caching (fp32 cache) reproduces its images to float rounding: the cache keeps its own copy of the deep path's
    output, and the next convolution may round differently on another buffer (bit-equal on some machines, not
    on others)."""
    model = unet_model()
    unet = model.transformer
    up = list(unet.up_blocks)
    feeder = unet.mid_block if branch == len(up) - 1 else up[len(up) - 2 - branch]
    kept, step = {}, [-1]

    def hook(module, args, output):
        if step[0] % 3 == 0:
            kept["feature"] = output
            return output
        return kept["feature"]

    handle = feeder.register_forward_hook(hook)
    try:
        reference = sample(model, [0, 1, 2], [0, 1, 2], SETTINGS, progress=False,
                           step_callback=lambda i, n, t: step.__setitem__(0, i))
    finally:
        handle.remove()
    run = measured_sample(model, make_policy(f"deepcache:interval=3,branch={branch}"), "fp32", [0, 1, 2], [0, 1, 2],
                          SETTINGS)
    torch.testing.assert_close(run.images, reference, rtol=1e-6, atol=1e-4)


def test_a_model_class_no_adapter_claims_is_one_line(tmp_path, capsys):
    folder = tmp_path / "sd" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"_class_name": "UNet3DConditionModel"}')
    code = main(["sample", "--model", str(folder.parent), "--steps", "2", "--num-samples", "1",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no cqpolicy adapter for UNet3DConditionModel" in err[0] and "UNet2DModel" in err[0]


def test_recording_a_unet_leaves_its_run_unchanged_and_measures_entropy_at_attention_layers():
    from test_recorder import record

    model = unet_model()
    plain = sample(model, [1, 2], [0, 1], SampleSettings(steps=5, guidance_scale=2.0), progress=False)
    images, cols = record(model)
    assert torch.equal(images, plain)
    assert len(cols["seed"]) == 5 * 12 * 4 and set(cols["unit"]) == {"layer"}  # steps x layers x rows
    attention = {i for i, layer in enumerate(model.adapter.blocks(model.transformer))
                 if model.adapter.is_attention(layer)}
    assert attention == {2, 4, 7, 9}  # down 1 (resnet, attention), mid (resnet, attention, resnet), up 1 (2 pairs)
    at_attention = np.isin(cols["block"], list(attention))
    assert ((cols["entropy"][at_attention] > 0) & (cols["entropy"][at_attention] <= 1)).all()
    assert np.isnan(cols["entropy"][~at_attention]).all()
    step0 = cols["step"] == 0
    assert np.isnan(cols["impact_local"][step0]).all() and (cols["impact_local"][~step0] > 0).all()


@pytest.mark.parametrize("target", [(2, 0, "layer"), (3, 5, "layer"), (4, 11, "layer")])
def test_unet_local_impact_equals_a_forced_reuse_run(target):
    """A UNet has no single block input to restart from: the probe reruns the call with the earlier layers fed
    their outputs; the label must still be the model-output error of reusing that one layer."""
    from test_recorder import ForceOnce, record

    from cqpolicy.runtime import enable

    model = unet_model()
    _, cols = record(model)
    step, block, unit = target
    outputs = {}
    capture = lambda i, t, x, out: outputs.__setitem__(i, out.clone())  # noqa: E731
    settings = SampleSettings(steps=5, guidance_scale=2.0)
    sample(model, [1, 2], [0, 1], settings, progress=False, output_callback=capture)
    reference = outputs[step]
    with enable(model.transformer, ForceOnce(step, block, unit), cache_format="fp32"):
        sample(model, [1, 2], [0, 1], settings, progress=False, output_callback=capture)
    expected = ((outputs[step] - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).numpy()
    rows = (cols["step"] == step) & (cols["block"] == block) & (cols["unit"] == unit)
    np.testing.assert_allclose(cols["impact_local"][rows], expected, rtol=1e-3, atol=1e-6)
    assert expected.min() > 0


def test_unet_traces_train_policies_that_deploy(tiny_unet_dir, tmp_path):
    """Trace -> train -> deploy on a UNet's layers through the CLI, for each learned kind."""
    traces = tmp_path / "traces"
    assert main(["trace", "--model", str(tiny_unet_dir), "--steps", "4", "--num-samples", "6", "--batch-size", "2",
                 "--probes", "local,downstream", "--out", str(traces)]) == 0
    model = load_model(str(tiny_unet_dir))
    settings = SampleSettings(steps=4, guidance_scale=2.0, batch_size=2)
    plain = measured_sample(model, None, "none", [0, 1], [0, 1], settings)
    for kind in ("mlp", "scheduler", "intervals"):
        out = tmp_path / kind
        assert main(["train", kind, "--traces", str(traces), "--max-epochs", "2", "--out", str(out)]) == 0
        assert json.loads((out / "policy.json").read_text())["model"]["units"] == ["layer"]
        threshold = ",threshold=1e9" if kind == "mlp" else ""  # everything predicted safe: reuses wherever allowed
        run = measured_sample(model, make_policy(f"learned:path={out}{threshold}"), "fp16", [0, 1], [0, 1], settings)
        assert run.reuse_ratio > 0 and run.macs < plain.macs, kind
        assert torch.isfinite(run.images).all() and not torch.equal(run.images, plain.images), kind


@pytest.mark.parametrize("spec", ["dps:groups=3,units=layer", "recat:groups=3,units=layer",
                                  "smoothcache:threshold=5,units=layer", "teacache:threshold=0.5,unit=layer",
                                  "taylorseer:interval=2,order=1,units=layer"])
def test_calibrated_and_forecasting_families_run_on_unet_layers(spec):
    model = unet_model()
    policy = make_policy(spec)
    policy.prepare(model, SETTINGS)
    run = measured_sample(model, policy, "fp32", [0, 1, 2], [0, 1, 2], SETTINGS)
    plain = measured_sample(model, None, "none", [0, 1, 2], [0, 1, 2], SETTINGS)
    assert 0 < run.reuse_ratio < 1 and run.macs < plain.macs and torch.isfinite(run.images).all()


def test_the_shipped_fmnist_unet_end_to_end():
    """The shipped weights by name: its 15 layers over 4 levels, `none` bit-identical, DeepCache reusing layers."""
    model = load_model("fmnist-unet")
    assert isinstance(model.adapter, UNet2DAdapter) and model.dtype == torch.float32
    assert model.latent_shape == (1, 28, 28) and model.num_classes == 10
    assert model.adapter.depths(model.transformer) == [0, 1, 2, 2, 3, 3, 3, 2, 2, 2, 2, 1, 1, 0, 0]
    settings = SampleSettings(steps=4, guidance_scale=model.default_guidance_scale, batch_size=2)
    plain = sample(model, [0, 7], [0, 1], settings, progress=False)
    with cqpolicy.enable(model.transformer, "none"):
        assert torch.equal(plain, sample(model, [0, 7], [0, 1], settings, progress=False))
    with cqpolicy.enable(model.transformer, "deepcache:interval=2,branch=0") as handle:
        cached = sample(model, [0, 7], [0, 1], settings, progress=False)
    assert handle.reuse_ratio > 0.3 and not torch.equal(plain, cached)
    assert float((plain - cached).abs().max()) < 1.0 and cached.isfinite().all()


def test_calibration_records_a_unets_layers_by_default():
    from cqpolicy.policies.calibration import record_unit_outputs

    outputs = record_unit_outputs(unet_model(), SampleSettings(steps=3, guidance_scale=2.0), num_samples=2)
    assert sorted(outputs) == [(layer, "layer") for layer in range(12)]
    assert all(v.shape[:2] == (3, 4) for v in outputs.values())  # steps x (2 samples x 2 CFG rows)


@pytest.mark.parametrize("target", [(4, 3, "layer", 3), (3, 11, "layer", 2)])
def test_unet_chain_labels_equal_a_run_that_reuses_a_stale_cache(target):
    from test_recorder import ForceStale, record

    from cqpolicy.runtime import enable

    model = unet_model()
    _, cols = record(model, chain=8)
    step, block, unit, stale = target
    outputs = {}
    capture = lambda i, t, x, out: outputs.__setitem__(i, out.clone())  # noqa: E731
    settings = SampleSettings(steps=5, guidance_scale=2.0)
    sample(model, [1, 2], [0, 1], settings, progress=False, output_callback=capture)
    reference = outputs[step]
    with enable(model.transformer, ForceStale(step, block, unit, stale), cache_format="fp32"):
        sample(model, [1, 2], [0, 1], settings, progress=False, output_callback=capture)
    expected = ((outputs[step] - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).numpy()
    rows = (cols["step"] == step) & (cols["block"] == block) & (cols["unit"] == unit)
    np.testing.assert_allclose(cols[f"impact_stale_{stale}"][rows], expected, rtol=1e-3, atol=1e-6)
    assert expected.min() > 0
