"""Text-conditioned and flow-matching models (PixArt, SD3, FLUX, Stable Diffusion) through the one sampler and
inside their own unmodified diffusers pipelines, on tiny random components called with prompt embeddings."""
import pytest
import torch

from conftest import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline
from cqpolicy.models.adapters import adapter_for, find_cache_units
from cqpolicy.models.loading import LoadedModel
from cqpolicy.models.prompts import Prompts
from cqpolicy.sampling import SampleSettings, initial_noise, sample

KINDS = ("pixart", "sd3", "flux", "sd")
BUILD = {"pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
         "sd": tiny_sd_pipeline}
GUIDANCE = {"pixart": 4.5, "sd3": 5.0, "flux": 3.5, "sd": 7.5}
SCHEDULER = {"pixart": "dpm", "sd3": "flow", "flux": "flow", "sd": "ddim"}
SIZE = 16  # pixels; latents are 8 x 8 (the tiny VAEs halve)


def prompt_table(kind: str, n: int = 3) -> Prompts:
    """``n`` random prompts and a negative one, as the kind's pipeline encodes them."""
    g = torch.Generator().manual_seed(1)
    width = 12 if kind == "sd" else 16
    tokens = 6 if kind == "pixart" else 5

    def rows(k):
        out = {"encoder_hidden_states": torch.randn(k, tokens, width, generator=g)}
        if kind == "pixart":
            mask = torch.ones(k, tokens, dtype=torch.long)
            mask[:, -2:] = 0  # padded tokens, as T5's
            out["encoder_attention_mask"] = mask
        if kind in ("sd3", "flux"):
            out["pooled_projections"] = torch.randn(k, 8, generator=g)
        return out

    return Prompts([f"prompt {i}" for i in range(n)], rows(n), None if kind == "flux" else rows(1))


def model_of(kind, pipe, prompts) -> LoadedModel:
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    return LoadedModel(kind, denoiser, dict(pipe.scheduler.config), pipe.vae, default_guidance_scale=GUIDANCE[kind],
                       prompts=prompts, latent_size=(8, 8))


def pipeline_call(kind, pipe, prompts, ids, noise, steps, guidance):
    """The unmodified pipeline on prompt rows ``ids`` from latents ``noise``; images in [0, 1]."""
    cond = prompts.take(torch.tensor(ids))
    null = prompts.null_rows(len(ids)) if prompts.null is not None else None
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE, output_type="pt",
                  prompt_embeds=cond["encoder_hidden_states"], latents=noise.clone())
    if kind == "pixart":
        kwargs.update(prompt_attention_mask=cond["encoder_attention_mask"], negative_prompt=None,
                      negative_prompt_embeds=null["encoder_hidden_states"],
                      negative_prompt_attention_mask=null["encoder_attention_mask"], use_resolution_binning=False)
    elif kind == "sd3":
        kwargs.update(pooled_prompt_embeds=cond["pooled_projections"],
                      negative_prompt_embeds=null["encoder_hidden_states"],
                      negative_pooled_prompt_embeds=null["pooled_projections"])
    elif kind == "flux":
        from cqpolicy.models.adapters.flux import pack

        kwargs.update(pooled_prompt_embeds=cond["pooled_projections"], latents=pack(noise))
    else:
        kwargs.update(negative_prompt_embeds=null["encoder_hidden_states"])
    with torch.no_grad():
        return pipe(**kwargs).images


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    kind = request.param
    pipe = BUILD[kind]()
    prompts = prompt_table(kind)
    return kind, pipe, prompts, model_of(kind, pipe, prompts)


def test_each_text_model_class_has_an_adapter_with_default_units(case):
    kind, pipe, prompts, model = case
    adapter = adapter_for(model.transformer)
    assert adapter.text_conditioned
    units = find_cache_units(model.transformer, adapter.default_units)
    assert {u.name for u in units} == set(adapter.default_units)


def test_the_sampler_gives_the_images_of_the_unmodified_pipeline(case):
    kind, pipe, prompts, model = case
    ids, seeds, steps = [0, 2], [5, 6], 4
    settings = SampleSettings(steps=steps, guidance_scale=GUIDANCE[kind], scheduler=SCHEDULER[kind], batch_size=2)
    ours = sample(model, ids, seeds, settings, progress=False)
    noise = initial_noise(seeds, model.latent_shape)
    theirs = pipeline_call(kind, pipe, prompts, ids, noise, steps, GUIDANCE[kind])
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=1e-4, atol=1e-4)


FAMILIES = ["fora:interval=2", "taylorseer:interval=2", "teacache:threshold=10", "smoothcache:threshold=0.5",
            "dps:groups=3", "recat:groups=3", "tgate:gate=0.5", "deepcache:interval=2"]


def applies(kind: str, spec: str) -> bool:
    family = spec.split(":")[0]
    if family == "tgate":
        return kind in ("pixart", "sd")
    return family != "deepcache" or kind == "sd"


def test_inside_the_unmodified_pipeline_none_is_bit_identical_and_every_family_changes_the_images(case):
    import cqpolicy

    kind, pipe, prompts, model = case
    pipe.default_sample_size = 8  # calibrating families sample at the pipeline's default size
    noise = initial_noise([3, 4], model.latent_shape)
    run = lambda: pipeline_call(kind, pipe, prompts, [0, 1], noise, 4, GUIDANCE[kind])  # noqa: E731
    plain = run()
    with cqpolicy.enable(pipe, "none", steps=4, guidance_scale=GUIDANCE[kind]):
        assert torch.equal(run(), plain)
    for spec in filter(lambda s: applies(kind, s), FAMILIES):
        with cqpolicy.enable(pipe, spec, steps=4, guidance_scale=GUIDANCE[kind], prompts=prompts) as handle:
            first = run()
            assert handle.reuse_ratio > 0, spec
            assert not torch.equal(first, plain), spec
            assert torch.equal(run(), first), f"{spec}: a second call differs from the first"
    assert torch.equal(run(), plain)  # every hook removed


def test_every_family_runs_through_the_sampler_with_the_adapters_default_units(case):
    from cqpolicy.evaluation.cost import measured_sample
    from cqpolicy.policies import make_policy

    kind, pipe, prompts, model = case
    settings = SampleSettings(steps=4, guidance_scale=GUIDANCE[kind], scheduler=SCHEDULER[kind], batch_size=2)
    plain = measured_sample(model, None, "fp16", [0, 1], [7, 8], settings)
    for spec in filter(lambda s: applies(kind, s), FAMILIES):
        policy = make_policy(spec)
        policy.prepare(model, settings)
        run = measured_sample(model, policy, "fp16", [0, 1], [7, 8], settings)
        assert run.reuse_ratio > 0 and run.macs < plain.macs, spec
        assert not torch.equal(run.images, plain.images), spec


def test_tgate_refuses_a_model_without_cross_attention():
    import cqpolicy

    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match="needs cross-attention units; FluxTransformer2DModel has none"):
        cqpolicy.enable(pipe, "tgate", steps=4)


def test_the_macs_of_joint_and_cross_attention_are_counted_exactly():
    """Per row: SD3's joint attention (image and text projections, attention over both token sets, both output
    projections; the last block has no text output projection) and PixArt's cross-attention (queries from the
    image, keys and values from the caption), against the arithmetic of their shapes."""
    from cqpolicy.evaluation.cost import model_costs

    pipe = tiny_sd3_pipeline()
    model = model_of("sd3", pipe, prompt_table("sd3"))
    costs = model_costs(model, SampleSettings(steps=1, guidance_scale=1.0, scheduler="flow", batch_size=1))
    n, text, d = (8 // 2) ** 2, 5, 16  # image tokens (8 x 8 latents, patch 2), prompt tokens, width (2 heads x 8)
    joint = 4 * n * d * d + 4 * text * d * d + 2 * (n + text) ** 2 * d
    assert costs.unit_macs[0, "attn"] == joint
    assert costs.unit_macs[1, "attn"] == joint - text * d * d  # context_pre_only: no to_add_out

    pipe = tiny_pixart_pipeline()
    model = model_of("pixart", pipe, prompt_table("pixart"))
    costs = model_costs(model, SampleSettings(steps=1, guidance_scale=1.0, scheduler="dpm", batch_size=1))
    text = 6
    assert costs.unit_macs[0, "attn2"] == 2 * n * d * d + 2 * text * d * d + 2 * n * text * d
