import pytest
import torch

from cqpolicy.models import ModelLoadError, load_model
from cqpolicy.sampling import SampleSettings, initial_noise, sample


def test_noise_per_sample_is_independent_of_batch():
    a = initial_noise([5, 6, 7], (1, 4, 4))
    b = initial_noise([6], (1, 4, 4))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_sample_is_the_same_whatever_the_batch_size(tiny_dit_dir, scheduler):
    model = load_model(str(tiny_dit_dir))
    labels, seeds = [0, 3, 7, 9], [10, 11, 12, 13]
    whole = sample(model, labels, seeds, SampleSettings(steps=4, guidance_scale=2.0, scheduler=scheduler,
                                                         batch_size=4), progress=False)
    split = sample(model, labels, seeds, SampleSettings(steps=4, guidance_scale=2.0, scheduler=scheduler,
                                                         batch_size=3), progress=False)
    one = sample(model, labels[2:3], seeds[2:3], SampleSettings(steps=4, guidance_scale=2.0, scheduler=scheduler,
                                                                batch_size=1), progress=False)
    assert whole.shape == (4, 1, 28, 28)
    # Batch size changes the GEMM blocking, so float32 rounding differs (~2e-5 seen with DPM's multistep
    # update); mixing samples up would differ by O(1).
    torch.testing.assert_close(whole, split, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole[2:3], one, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(whole[0], whole[1])


def test_guidance_changes_the_result_and_one_means_conditional_only(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    run = lambda g: sample(model, [1, 2], [0, 1], SampleSettings(steps=3, guidance_scale=g), progress=False)
    assert not torch.allclose(run(1.0), run(4.0))
    # guidance 0 = the unconditional branch alone: labels stop mattering
    uncond_a = sample(model, [1, 2], [0, 1], SampleSettings(steps=3, guidance_scale=0.0), progress=False)
    uncond_b = sample(model, [5, 6], [0, 1], SampleSettings(steps=3, guidance_scale=0.0), progress=False)
    torch.testing.assert_close(uncond_a, uncond_b)


def test_dit_xl_layout_pipeline_with_learned_sigma_and_vae(tiny_xl_pipeline_dir):
    model = load_model(str(tiny_xl_pipeline_dir))
    assert model.learned_sigma and model.vae is not None and model.null_class == 1000
    images = sample(model, [0, 999], [0, 1], SampleSettings(steps=3, guidance_scale=4.0), progress=False)
    assert images.shape == (2, 3, 16, 16)  # VAE decode: 8x8 latents -> 16x16 RGB
    assert torch.isfinite(images).all()


def test_ddim_matches_diffusers_dit_pipeline(tiny_xl_pipeline_dir):
    """Our loop reproduces an unmodified DiTPipeline call (same noise, CFG, learned sigma, VAE)."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_xl_pipeline_dir)
    model = load_model(str(tiny_xl_pipeline_dir))
    noise = initial_noise([3, 4], model.latent_shape)
    import diffusers.pipelines.dit.pipeline_dit as dit_module

    original = dit_module.randn_tensor
    dit_module.randn_tensor = lambda shape, **kw: noise.clone()
    try:
        theirs = pipe(class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=5, output_type="pt").images
    finally:
        dit_module.randn_tensor = original
    ours = sample(model, [1, 2], [3, 4], SampleSettings(steps=5, guidance_scale=4.0), progress=False)
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (SampleSettings(steps=0), "at least 1"),
    (SampleSettings(guidance_scale=-1.0), "non-negative"),
    (SampleSettings(scheduler="euler"), "unknown scheduler"),
])
def test_bad_settings_are_rejected(tiny_dit_dir, settings, message):
    model = load_model(str(tiny_dit_dir))
    with pytest.raises(ValueError, match=message):
        sample(model, [0], [0], settings, progress=False)


def test_unknown_model_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no diffusers model"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="local Hugging Face cache"):
        load_model("facebook/DiT-XL-2-256-not-cached")
