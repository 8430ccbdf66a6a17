"""The Stable Diffusion layout (UNet2DConditionModel) on a tiny random pipeline: hooks inside the unmodified
diffusers pipeline, DeepCache against the `DeepCache` wheel's own helper."""
import pytest
import torch

import cqpolicy
from conftest import tiny_sd_pipeline
from cqpolicy.models.adapters import UNet2DConditionAdapter, adapter_for

STEPS = 6


def prompts(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 5, 12, generator=g), torch.randn(batch, 5, 12, generator=g)


def generate(pipe, steps=STEPS):
    positive, negative = prompts()
    return pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=steps,
                guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_the_sd_unet_has_its_layers_as_units_and_none_is_bit_identical_in_the_pipeline():
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe.unet)
    assert isinstance(adapter, UNet2DConditionAdapter)
    layers = adapter.blocks(pipe.unet)
    kinds = [type(m).__name__[0] for m in layers]  # R(esnet) / T(ransformer2DModel)
    assert "".join(kinds) == "RTRT" + "RR" + "RTR" + "RRR" + "RTRTRT"
    assert adapter.depths(pipe.unet) == [0] * 4 + [1] * 2 + [2] * 3 + [1] * 3 + [0] * 6
    plain = generate(pipe)
    with cqpolicy.enable(pipe.unet, "none") as handle:
        hooked = generate(pipe)
        assert handle.calls == 1 and handle.step == STEPS - 1  # steps inferred from the pipeline's timesteps
    assert torch.equal(plain, hooked)
    with cqpolicy.enable(pipe.unet, "fora:interval=2,unit=layer") as handle:
        fora = generate(pipe)
        assert handle.reuse_ratio == pytest.approx(0.5, abs=0.01)
    assert not torch.equal(fora, plain) and torch.isfinite(fora).all()


@pytest.mark.parametrize("interval, branch", [(2, 0), (3, 0), (3, 1)])
def test_deepcache_gives_the_images_of_the_deepcache_wheel(interval, branch):
    """The wheel's ``cache_branch_id`` counts layers within a down block (3 per block); with 2 resnets per block,
    id 3 b + 2 keeps every layer of levels <= b computing (its downsampler output, which only deeper levels
    read, is reused): our ``branch=b``."""
    deepcache = pytest.importorskip("DeepCache")
    pipe = tiny_sd_pipeline()
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=3 * branch + 2)
    helper.enable()
    try:
        theirs = generate(pipe)
    finally:
        helper.disable()
    with cqpolicy.enable(pipe.unet, f"deepcache:interval={interval},branch={branch}", cache_format="fp32"):
        ours = generate(pipe)
    assert not torch.equal(ours, generate(pipe))  # it did reuse
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sampling_an_sd_unet_without_prompts_is_refused_in_one_line(tmp_path, capsys):
    from cqpolicy.cli import main

    pipe = tiny_sd_pipeline()
    pipe.unet.save_pretrained(tmp_path / "sd" / "unet")
    code = main(["sample", "--model", str(tmp_path / "sd"), "--steps", "2", "--num-samples", "1",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "conditioned on prompts" in err[0] and "--prompts" in err[0], err
    assert not (tmp_path / "out").exists()
