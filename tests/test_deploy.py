"""``cqpolicy.enable`` on the user's own, unmodified diffusers pipelines: a policy sees what cqpolicy's sampler
gives it (steps, step count, log-SNR from the pipeline's scheduler), is prepared (calibration, artifact checks),
and makes the same decisions and images as in the sampler for the same noise."""
import pytest
import torch

import cqpolicy
from cqpolicy.cli import main
from cqpolicy.models import load_model
from cqpolicy.models.loading import LoadedModel
from cqpolicy.policies import make_policy
from cqpolicy.policies.artifact import ArtifactError
from cqpolicy.sampling import SampleSettings, sample

STEPS = 6
SEEDS = [3, 4]
LABELS = [1, 2]


def tiny_vae(channels: int = 1):
    """A one-level AutoencoderKL (no downsampling) with scaling factor 1, so both decodes divide by exactly 1."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels,
                         block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, scaling_factor=1.0).eval()


@pytest.fixture
def dit(tiny_dit_dir):
    """The tiny fmnist-style DiT as a LoadedModel (with a VAE) and as an unmodified DiTPipeline sharing its modules."""
    from diffusers import DDIMScheduler, DiTPipeline

    loaded = load_model(str(tiny_dit_dir))
    model = LoadedModel(loaded.name, loaded.transformer, loaded.scheduler_config, tiny_vae())
    pipe = DiTPipeline(transformer=loaded.transformer, vae=model.vae,
                       scheduler=DDIMScheduler.from_config(loaded.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def pipeline_images(pipe, steps=STEPS, **kwargs):
    """A DiTPipeline call at guidance 1 (it hard-codes the null class 1000; the tiny DiT has 10 classes)."""
    generator = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(class_labels=LABELS, guidance_scale=1.0, num_inference_steps=steps, generator=generator,
                output_type="pt", **kwargs).images


def sampler_images(model, steps=STEPS):
    images = sample(model, LABELS, SEEDS, SampleSettings(steps=steps, guidance_scale=1.0), progress=False)
    return (images / 2 + 0.5).clamp(0, 1)


@pytest.fixture
def artifacts(tiny_dit_dir, tmp_path):
    traces = tmp_path / "traces"
    assert main(["trace", "--model", str(tiny_dit_dir), "--steps", str(STEPS), "--num-samples", "4",
                 "--batch-size", "2", "--guidance-scale", "2", "--out", str(traces)]) == 0
    assert main(["train", "mlp", "--traces", str(traces), "--max-epochs", "2", "--out", str(tmp_path / "mlp")]) == 0
    assert main(["train", "scheduler", "--traces", str(traces), "--max-epochs", "2",
                 "--out", str(tmp_path / "sched")]) == 0
    return tmp_path / "mlp", tmp_path / "sched"


def test_same_noise_same_images_uncached(dit):
    model, pipe = dit
    assert torch.equal(sampler_images(model), pipeline_images(pipe))
    with cqpolicy.enable(pipe, "none") as handle:
        assert torch.equal(sampler_images(model), pipeline_images(pipe))
        assert handle.num_steps == STEPS and handle.log_snr is not None


def test_learned_mlp_decides_in_the_pipeline_as_in_the_sampler(dit, artifacts):
    """The bug this guards: outside the sampler the MLP's progress and log-SNR features were NaN and it never
    reused. A threshold where it reuses some units and not others makes the comparison data-dependent."""
    model, pipe = dit
    mlp, _ = artifacts
    chosen = None
    for threshold in (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0):
        with cqpolicy.enable(model.transformer, f"learned:path={mlp},threshold={threshold}") as handle:
            ours = sampler_images(model)
            if 0 < handle.reuse_ratio < 1:
                chosen, ratio, rows = threshold, handle.reuse_ratio, dict(handle.unit_rows)
                break
    assert chosen is not None, "no threshold gave a mix of reuse and compute"
    with cqpolicy.enable(pipe, f"learned:path={mlp},threshold={chosen}") as handle:
        theirs = pipeline_images(pipe)
        assert handle.reuse_ratio == pytest.approx(ratio) and dict(handle.unit_rows) == rows
    assert torch.equal(ours, theirs)


def test_step_indexed_artifact_is_prepared_and_checked(dit, artifacts):
    model, pipe = dit
    _, sched = artifacts
    spec = f"learned:path={sched}"
    with pytest.raises(ArtifactError, match="6 steps"):  # the pipeline's default 50 steps: refused at enable
        cqpolicy.enable(pipe, spec)
    with cqpolicy.enable(model.transformer, spec) as handle:
        ours, rows = sampler_images(model), dict(handle.unit_rows)
    with cqpolicy.enable(pipe, spec, steps=STEPS) as handle:
        assert torch.equal(ours, pipeline_images(pipe)) and dict(handle.unit_rows) == rows
        with pytest.raises(Exception, match="6 steps"):  # the same handle called with another step count
            pipeline_images(pipe, steps=5)


def test_forecast_and_interval_artifacts_in_the_pipeline(dit, artifacts, tiny_dit_dir, tmp_path):
    """The other artifact kinds a user deploys: a fitted forecast (its weighted sums run inside the pipeline's
    own call) and an interval fit (a step-indexed table)."""
    from conftest import mlflow_store_at

    from cqpolicy.training.forecast import fit_forecast
    from cqpolicy.training.train import train_policy

    model, pipe = dit
    with mlflow_store_at(tmp_path):
        fit_forecast(str(tiny_dit_dir), "fora:interval=3", tmp_path / "fc", steps=STEPS, samples=2, val_samples=2,
                     batch_size=2, progress=False)
        train_policy([tmp_path / "traces"], kind="intervals", out_dir=tmp_path / "iv", compute_budget=0.5)
    for spec in (f"forecast:path={tmp_path / 'fc'}", f"learned:path={tmp_path / 'iv'}"):
        with cqpolicy.enable(model.transformer, spec) as handle:
            ours, rows, macs = sampler_images(model), dict(handle.unit_rows), handle.policy_macs
        with cqpolicy.enable(pipe, spec, steps=STEPS) as handle:
            assert torch.equal(ours, pipeline_images(pipe)), spec
            assert dict(handle.unit_rows) == rows and handle.policy_macs == macs and handle.reuse_ratio > 0


def test_calibrating_family_is_prepared_by_enable(dit):
    model, pipe = dit
    spec = "smoothcache:threshold=0.3,calibration_samples=2"
    policy = make_policy(spec)
    policy.prepare(model, SampleSettings(steps=STEPS, guidance_scale=1.0))
    with cqpolicy.enable(model.transformer, policy) as handle:
        ours, ratio = sampler_images(model), handle.reuse_ratio
    with cqpolicy.enable(pipe, spec, steps=STEPS, guidance_scale=1.0) as handle:
        assert torch.equal(ours, pipeline_images(pipe)) and handle.reuse_ratio == pytest.approx(ratio)
    assert ratio > 0


def test_bare_denoiser_refuses_what_it_cannot_know(dit, artifacts, tiny_dit_dir):
    from conftest import tiny_fmnist_dit

    model, pipe = dit
    mlp, _ = artifacts
    with cqpolicy.enable(pipe.transformer, f"learned:path={mlp}"):  # no scheduler to follow: no progress, no SNR
        with pytest.raises(ValueError, match="bare denoiser"):
            pipeline_images(pipe)
    with cqpolicy.enable(pipe.transformer, f"learned:path={mlp}", scheduler=pipe.scheduler, steps=STEPS):
        pipeline_images(pipe)  # given the scheduler, it runs
    other = tiny_fmnist_dit(seed=1)  # same layout, other weights: refused at enable, pipeline or not
    with pytest.raises(ArtifactError, match="weight hash"):
        cqpolicy.enable(other, f"learned:path={mlp}")
    assert getattr(other, "_cqpolicy_runtime", None) is None


def test_unet_pipeline_with_family_default_units():
    """fora and teacache on a DDIMPipeline's UNet2DModel take the adapter's units (``layer``), and the pipeline
    gives the sampler's images; on a Stable Diffusion UNet too (it used to fail naming DiT units)."""
    from conftest import tiny_sd_pipeline, tiny_unet
    from diffusers import DDIMPipeline

    from cqpolicy.models import fmnist_dit

    unet = tiny_unet(conditional=False)
    scheduler_config = dict(fmnist_dit.build_scheduler().config)
    model = LoadedModel("tiny-unet", unet, scheduler_config)
    pipe = DDIMPipeline(unet=unet, scheduler=fmnist_dit.build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    for spec in ("fora:interval=2", "teacache:threshold=0.5"):
        with cqpolicy.enable(model.transformer, spec) as handle:
            ours = sample(model, [0, 0], SEEDS, SampleSettings(steps=STEPS, guidance_scale=1.0), progress=False)
            ratio = handle.reuse_ratio
        with cqpolicy.enable(pipe, spec) as handle:
            generator = [torch.Generator().manual_seed(s) for s in SEEDS]
            theirs = pipe(batch_size=2, generator=generator, num_inference_steps=STEPS, output_type="np").images
            assert ratio > 0 and handle.reuse_ratio == pytest.approx(ratio)
        theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-6, rtol=0)
    sd = tiny_sd_pipeline()
    with cqpolicy.enable(sd, "fora:interval=2") as handle:
        sd(prompt_embeds=torch.randn(1, 5, 12), negative_prompt_embeds=torch.zeros(1, 5, 12), num_inference_steps=4,
           generator=torch.Generator().manual_seed(0), output_type="latent")
        assert handle.reuse_ratio == pytest.approx(0.5) and handle.num_steps == 4


def test_bad_target_is_one_line_error():
    with pytest.raises(TypeError, match="diffusers pipeline"):
        cqpolicy.enable(object(), "none")
