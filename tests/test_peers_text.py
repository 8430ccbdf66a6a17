"""Peer tools on the text-conditioned models (PixArt, SD3, FLUX), through our sampler and inside an unmodified
FluxPipeline: diffusers' own cache hooks where they run, and cache-dit's DBCache through its own block adapters."""
import importlib.util

import pytest
import torch

import cqpolicy
from conftest import tiny_flux_pipeline
from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.cost import count_macs, measured_sample
from cqpolicy.models.adapters import adapter_for
from cqpolicy.policies import make_policy
from cqpolicy.sampling import SampleSettings, initial_noise, sample
from test_text_models import BUILD, GUIDANCE, SCHEDULER, model_of, pipeline_call, prompt_table

KINDS = ("pixart", "sd3", "flux")
# the tiny models change a lot between 4 steps: thresholds high enough to skip, ranges over every timestep
PEERS = {
    "diffusers-fbc:threshold=10": ("pixart", "flux"),
    "diffusers-taylorseer:interval=2,warmup=1": KINDS,
    "diffusers-magcache:threshold=10,retention=0,calibration_samples=2": KINDS,
    "diffusers-pab:low=0,high=1000,cross_interval=2": KINDS,
    "diffusers-fastercache:high=1000": ("flux",),
    "cache-dit:threshold=10,fn=1,warmup=0": KINDS,
}
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None  # an optional extra
CASES = [pytest.param(kind, spec, id=f"{kind}-{spec.split(':')[0]}",
                      marks=pytest.mark.skipif(spec.startswith("cache-dit") and not HAS_CACHE_DIT,
                                               reason="cache-dit not installed"))
         for spec, kinds in PEERS.items() for kind in kinds]
IDS, SEEDS = [0, 1], [7, 8]


def settings_of(kind):
    return SampleSettings(steps=4, guidance_scale=GUIDANCE[kind], scheduler=SCHEDULER[kind], batch_size=2)


@pytest.fixture(scope="module")
def models():
    """Per kind, built on first use: (pipeline, prompts, LoadedModel, the plain model's MeasuredRun)."""
    built = {}

    def get(kind):
        if kind not in built:
            pipe, prompts = BUILD[kind](), prompt_table(kind)
            model = model_of(kind, pipe, prompts)
            built[kind] = pipe, prompts, model, measured_sample(model, None, "fp16", IDS, SEEDS, settings_of(kind))
        return built[kind]

    return get


def prepared(spec, model, settings):
    policy = make_policy(spec)
    policy.prepare(model, settings)
    return policy


@pytest.mark.parametrize("kind, spec", CASES)
def test_peer_skips_work_and_keeps_no_state_across_calls(models, kind, spec):
    _, _, model, plain = models(kind)
    settings = settings_of(kind)
    policy = prepared(spec, model, settings)
    run = measured_sample(model, policy, "fp16", IDS, SEEDS, settings)
    assert run.macs_source == "leaf-module row counts" and run.macs < plain.macs, spec
    assert torch.isfinite(run.images).all() and not torch.allclose(run.images, plain.images), spec
    with cqpolicy.enable(model.transformer, policy) as handle:
        first = sample(model, IDS, SEEDS, settings, progress=False)
        second = sample(model, IDS, SEEDS, settings, progress=False)  # the peer's state is reset per call
        flops_macs, _ = count_macs(lambda: sample(model, IDS, SEEDS, settings, progress=False))
        assert handle.reuse_ratio is None and handle.cache_bytes is None
    assert torch.equal(first, second) and torch.equal(first, run.images), spec
    assert run.macs == flops_macs, spec  # the leaf row counts see what the peer's hooks really ran
    assert torch.equal(sample(model, IDS, SEEDS, settings, progress=False), plain.images)  # hooks removed


def _module_state(model):
    """Every submodule's attributes and child order, and the state dict's keys in order."""
    return ({name: (sorted(vars(module)), list(module._modules)) for name, module in model.named_modules()},
            list(model.state_dict()))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_dit_threshold_zero_is_the_plain_model_and_detach_restores_it(models, kind):
    """cache-dit's patched forwards (FLUX's FluxPatchFunctor) and block loops compute what the model does."""
    pytest.importorskip("cache_dit")
    _, _, model, plain = models(kind)
    with cqpolicy.enable(model.transformer, "none"):  # what the runtime's own hooks leave behind
        pass
    before, forward = _module_state(model.transformer), type(model.transformer).forward
    spec = "cache-dit:threshold=0,fn=1,warmup=0"
    run = measured_sample(model, make_policy(spec), "fp16", IDS, SEEDS, settings_of(kind))
    assert run.macs == plain.macs and torch.equal(run.images, plain.images)
    assert _module_state(model.transformer) == before
    assert model.transformer.forward.__func__ is forward


@pytest.mark.parametrize("spec", [case.values[1] for case in CASES if case.values[0] == "flux"])
def test_flux_peers_inside_the_unmodified_pipeline(models, spec):
    """FluxPipeline sets its own cache context ("cond") around each call; the runtime's step context replaces it,
    and MagCache calibrates in ``enable`` (on the prompts given) before the hooks go in."""
    if spec.startswith("cache-dit") and not HAS_CACHE_DIT:
        pytest.skip("cache-dit not installed")
    pipe, prompts, model, _ = models("flux")
    pipe.default_sample_size = 8  # calibrating peers sample at the pipeline's default size
    noise = initial_noise([3, 4], model.latent_shape)
    run = lambda: pipeline_call("flux", pipe, prompts, [0, 1], noise, 4, GUIDANCE["flux"])  # noqa: E731
    plain = run()
    with cqpolicy.enable(pipe, spec, steps=4, guidance_scale=GUIDANCE["flux"], prompts=prompts) as handle:
        first = run()
        assert not torch.equal(first, plain)
        assert torch.equal(run(), first)  # a second call: the same again
        assert handle.calls == 2
    assert torch.equal(run(), plain)  # every hook removed


def test_magcache_calibrates_on_calibration_seeds_per_setting(models, monkeypatch):
    import cqpolicy.sampling

    _, _, model, _ = models("flux")
    seen, original = [], cqpolicy.sampling.sample

    def spy(model, labels, seeds, *args, **kwargs):
        seen.append(list(seeds))
        return original(model, labels, seeds, *args, **kwargs)

    monkeypatch.setattr(cqpolicy.sampling, "sample", spy)
    settings = settings_of("flux")
    policy = prepared("diffusers-magcache:calibration_samples=3", model, settings)
    assert seen == [[seed_roles.start("calibration") + i for i in range(3)]] and policy.calibration_images == 3
    assert len(policy.ratios) == settings.steps and policy.ratios[0] == 1.0  # the first step has no previous one
    assert all(r > 0 for r in policy.ratios[1:]) and policy.ratios[1:] != [1.0] * 3
    policy.prepare(model, settings)  # once per setting
    assert len(seen) == 1
    with cqpolicy.enable(model.transformer, policy):
        with pytest.raises(ValueError, match="calibrated for 4 steps, run with 3"):
            sample(model, IDS, SEEDS, SampleSettings(steps=3, guidance_scale=3.5, scheduler="flow"), progress=False)


def test_magcache_needs_prepare():
    pipe = tiny_flux_pipeline()
    with pytest.raises(RuntimeError, match="not calibrated yet"):
        cqpolicy.enable(pipe.transformer, "diffusers-magcache")


@pytest.mark.parametrize("kind, spec, message", [
    ("sd3", "diffusers-fbc", "cannot run SD3Transformer2DModel: its tail hook subtracts a text stream"),
    ("pixart", "diffusers-fastercache", "runs on models without a CFG batch"),
    ("sd3", "diffusers-fastercache", "runs on models without a CFG batch"),
])
def test_peers_refuse_what_they_cannot_run_and_leave_the_model_as_it_was(models, kind, spec, message):
    _, _, model, plain = models(kind)
    with pytest.raises(ValueError, match=message):
        cqpolicy.enable(model.transformer, spec)
    assert torch.equal(sample(model, IDS, SEEDS, settings_of(kind), progress=False), plain.images)


def test_fastercache_runs_on_a_model_without_guidance():
    """FLUX.1-schnell's layout: no guidance input, no CFG batch."""
    pipe, prompts = tiny_flux_pipeline(guidance_embeds=False), prompt_table("flux")
    model = model_of("flux", pipe, prompts)
    assert adapter_for(model.transformer).guidance(model.transformer) == "none"
    settings = SampleSettings(steps=4, guidance_scale=1.0, scheduler="flow", batch_size=2)
    plain = measured_sample(model, None, "fp16", IDS, SEEDS, settings)
    run = measured_sample(model, make_policy("diffusers-fastercache:high=1000"), "fp16", IDS, SEEDS, settings)
    assert run.macs < plain.macs and not torch.allclose(run.images, plain.images)


@pytest.mark.parametrize("spec, message", [
    ("diffusers-magcache:threshold=-1", "threshold >= 0"),
    ("diffusers-magcache:retention=1.5", "0 <= retention <= 1"),
    ("diffusers-magcache:calibration_samples=0", "calibration_samples >= 1"),
    ("diffusers-pab:interval=0", "interval >= 1"),
    ("diffusers-pab:low=800,high=100", "low < high"),
    ("diffusers-fastercache:interval=0", "interval >= 1"),
])
def test_new_peers_reject_bad_options(spec, message):
    with pytest.raises(ValueError, match=message):
        make_policy(spec)
