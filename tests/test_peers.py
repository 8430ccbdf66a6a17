"""Peer tools on the same model: diffusers' own cache hooks and cache-dit, driven by our step context."""
import pytest
import torch

import cqpolicy
from conftest import dit_pipeline_call
from cqpolicy.evaluation.cost import count_macs, measured_sample
from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=8, guidance_scale=2.0)


def run(model):
    return sample(model, [1, 2], [0, 1], SETTINGS, progress=False)


@pytest.mark.parametrize("spec", ["diffusers-fbc:threshold=10", "diffusers-taylorseer:interval=2,warmup=2"])
def test_diffusers_hooks_run_skip_work_and_detach(tiny_dit_dir, spec):
    model = load_model(str(tiny_dit_dir))
    plain_macs, _ = count_macs(lambda: run(model))
    plain = run(model)
    with cqpolicy.enable(model.transformer, spec) as handle:
        macs, _ = count_macs(lambda: run(model))
        first, second = run(model), run(model)  # state is reset per call: the same again
        assert handle.reuse_ratio is None and handle.cache_bytes is None
    assert macs < 0.9 * plain_macs
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain)
    assert torch.equal(run(model), plain)  # hooks removed


def test_fbc_threshold_zero_never_skips(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    plain_macs, plain = count_macs(lambda: run(model))
    with cqpolicy.enable(model.transformer, "diffusers-fbc:threshold=0"):
        macs, out = count_macs(lambda: run(model))
    assert macs == plain_macs and torch.equal(out, plain)


def test_smoothcache_wheel_agrees_with_our_schedule_policy(tiny_dit_dir, tmp_path):
    """The wheel's DiffuserCacheHelper and our `schedule` run the same attn1 schedule: same images."""
    pytest.importorskip("SmoothCache")
    import json

    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"attn1": [1, 0, 1, 0, 0, 1, 0, 1]}))
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, f"schedule:path={path}", cache_format="fp32") as ours_handle:
        ours = run(model)
        assert ours_handle.reuse_ratio > 0
    with cqpolicy.enable(model.transformer, f"smoothcache-wheel:path={path}"):
        theirs = run(model)
        theirs_again = run(model)  # the wheel alone would run uncached here; our adapter re-enables it
    assert torch.equal(ours, theirs) and torch.equal(theirs, theirs_again)
    assert not torch.allclose(ours, run(model))


def _module_state(model):
    """Every submodule's attributes and child order, and the state dict's keys in order."""
    return ({name: (sorted(vars(module)), list(module._modules)) for name, module in model.named_modules()},
            list(model.state_dict()))


def _cache_dit_stats(module):
    import cache_dit

    return cache_dit.summary(module, logging=False)[0]


def test_cache_dit_threshold_zero_is_the_plain_model_and_detach_restores_it(tiny_dit_dir):
    pytest.importorskip("cache_dit")
    from diffusers import DiTPipeline, DiTTransformer2DModel

    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, "none"):  # what the runtime's own hooks leave behind
        pass
    before, plain, pipeline_call = _module_state(model.transformer), run(model), DiTPipeline.__call__
    spec = "cache-dit:threshold=0,fn=1,warmup=0"
    with cqpolicy.enable(model.transformer, spec):
        # cache-dit compares nothing at threshold 0 but runs the same ops in the same order: bit-identical
        assert torch.equal(run(model), plain)
        assert _cache_dit_stats(model.transformer).cached_steps == []
    cached = measured_sample(model, make_policy(spec), "fp16", [1, 2], [0, 1], SETTINGS)
    assert cached.macs == measured_sample(model, None, "fp16", [1, 2], [0, 1], SETTINGS).macs
    assert torch.equal(cached.images, plain)
    # no patched forward, _norm1_emb, cache-dit attribute or moved blocks left; pipelines untouched
    assert _module_state(model.transformer) == before
    assert model.transformer.forward.__func__ is DiTTransformer2DModel.forward
    assert DiTPipeline.__call__ is pipeline_call
    assert torch.equal(run(model), plain)


def test_cache_dit_skips_blocks_and_keeps_no_state_across_calls(tiny_dit_dir):
    pytest.importorskip("cache_dit")
    model = load_model(str(tiny_dit_dir))
    plain = measured_sample(model, None, "fp16", [1, 2], [0, 1], SETTINGS)
    # the tiny model's residuals change by ~0.3 a step; no warmup: a context left from the last call would reuse at
    # its step 0
    spec = "cache-dit:threshold=0.9,fn=1,warmup=0"
    cached = measured_sample(model, make_policy(spec), "fp16", [1, 2], [0, 1], SETTINGS)
    assert cached.macs < plain.macs and cached.macs_source == "leaf-module row counts"
    assert torch.isfinite(cached.images).all() and not torch.allclose(cached.images, plain.images)
    with cqpolicy.enable(model.transformer, spec) as handle:
        first = run(model)
        assert _cache_dit_stats(model.transformer).cached_steps == list(range(1, SETTINGS.steps))
        second = run(model)  # a fresh cache-dit context per sampling call
        assert handle.reuse_ratio is None and handle.cache_bytes is None
    assert torch.equal(first, second) and torch.equal(first, cached.images)


@pytest.mark.parametrize("spec, message", [
    ("cache-dit:fn=0", "fn >= 1"),
    ("cache-dit:threshold=-0.1", "threshold >= 0"),
    ("cache-dit:max_cached=-2", "max_cached >= -1"),
])
def test_cache_dit_rejects_bad_options(spec, message):
    with pytest.raises(ValueError, match=message):
        make_policy(spec)


def test_cache_dit_needs_middle_blocks_and_refuses_without_touching_the_model(tiny_dit_dir):
    pytest.importorskip("cache_dit")
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, "none"):
        pass
    before = _module_state(model.transformer)
    with pytest.raises(ValueError, match="fn=8 \\+ bn=0 must leave some of the model's 2 blocks"):
        cqpolicy.enable(model.transformer, "cache-dit")  # cache-dit's default Fn_compute_blocks=8
    assert _module_state(model.transformer) == before


def test_cache_dit_policy_matches_cache_dit_driving_a_dit_pipeline(tiny_xl_pipeline_dir):
    """cache-dit on an actual DiTPipeline (its registered DiT adapter, a context per pipeline call) and our policy in
    our sampler compute bit-identical residual diffs, so they cache the same steps, and every transformer output is
    bit-identical. The images are close, not equal, for a reason outside the transformer: DiTPipeline decodes
    ``1 / scaling_factor * latents``, our sampler ``latents / scaling_factor`` (the final latents are equal; they
    reach ~300 here, so the VAE inputs differ by ~1e-4): the tolerance of test_ddim_matches_diffusers_dit_pipeline.
    Our policy inside an unmodified DiTPipeline (the runtime infers the calls) gives cache-dit's images exactly."""
    cache_dit = pytest.importorskip("cache_dit")
    from diffusers import DiTPipeline

    from cqpolicy.sampling.sampler import initial_noise

    steps, spec = 10, "cache-dit:threshold=0.2,fn=1,bn=0,warmup=2"
    noise = initial_noise([3, 4], (4, 8, 8))

    def outputs_of(transformer, outputs):
        return transformer.register_forward_hook(lambda module, args, out: outputs.append(out.sample))

    pipe = DiTPipeline.from_pretrained(tiny_xl_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    theirs_outputs = []
    handle = outputs_of(pipe.transformer, theirs_outputs)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=2))
    try:
        theirs = dit_pipeline_call(pipe, noise, steps)
        theirs_stats = _cache_dit_stats(pipe)
    finally:
        cache_dit.disable_cache(pipe)  # it patched DiTPipeline.__call__ on the class
        handle.remove()

    model = load_model(str(tiny_xl_pipeline_dir))
    ours_outputs = []
    handle = outputs_of(model.transformer, ours_outputs)
    with cqpolicy.enable(model.transformer, spec):
        ours = sample(model, [1, 2], [3, 4], SampleSettings(steps=steps, guidance_scale=4.0), progress=False)
        ours_stats = _cache_dit_stats(model.transformer)
    handle.remove()
    assert 0 < len(theirs_stats.cached_steps) < steps - 2  # the threshold decides: some steps cached, some not
    assert ours_stats.cached_steps == theirs_stats.cached_steps
    assert ours_stats.residual_diffs == theirs_stats.residual_diffs
    assert len(ours_outputs) == len(theirs_outputs) == steps
    assert all(torch.equal(a, b) for a, b in zip(ours_outputs, theirs_outputs))
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=1e-4)

    unmodified = DiTPipeline.from_pretrained(tiny_xl_pipeline_dir)
    unmodified.set_progress_bar_config(disable=True)
    with cqpolicy.enable(unmodified.transformer, spec) as handle:
        first, second = dit_pipeline_call(unmodified, noise, steps), dit_pipeline_call(unmodified, noise, steps)
        assert handle.calls == 2
    assert torch.equal(first, theirs) and torch.equal(second, theirs)
