"""The one denoising loop: diffusers schedulers, batched classifier-free guidance, per-sample seeds.

Every model run in cqpolicy (plain sampling, tracing, benchmarking) goes through ``sample``. Sample ``i``
always starts from the noise of ``torch.Generator().manual_seed(seeds[i])``, so a sample is the same
whatever batch it falls in. ``step_callback(step_index, num_steps, timestep)`` runs before every model
call: the runtime uses it to learn the step it is in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from cqpolicy import defaults
from cqpolicy.models.loading import LoadedModel
from cqpolicy.runtime.context import schedule_log_snrs
from cqpolicy.runtime.runtime import active_runtime

SCHEDULERS = ("ddim", "dpm")


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of family ``name`` built from the model's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")


def initial_noise(seeds: list[int], shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """One independent noise tensor per seed, stacked: independent of the batch a sample lands in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
                       ).to(device=device, dtype=dtype)


def step_log_snrs(model: LoadedModel, settings: "SampleSettings") -> list[float]:
    """The log-SNR of every step of a run with ``settings``, in sampling order (what ``set_step`` reports)."""
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
    scheduler.set_timesteps(int(settings.steps))
    return schedule_log_snrs(scheduler)


@dataclass
class SampleSettings:
    steps: int = defaults.STEPS
    guidance_scale: float = defaults.GUIDANCE_SCALE
    scheduler: str = defaults.SCHEDULER
    batch_size: int = defaults.BATCH_SIZE

    def validate(self):
        if int(self.steps) < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"--guidance-scale must be non-negative, got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


def settings_for(model: LoadedModel, steps: int = defaults.STEPS, scheduler: str = defaults.SCHEDULER,
                 batch_size: int = defaults.BATCH_SIZE, guidance_scale: float | None = None) -> SampleSettings:
    """Validated settings for ``model`` (``guidance_scale`` None: the model's default)."""
    settings = SampleSettings(steps=steps, scheduler=scheduler, batch_size=batch_size,
                              guidance_scale=defaults.guidance_for(model, guidance_scale))
    settings.validate()
    return settings


def uses_cfg(guidance_scale: float) -> bool:
    return guidance_scale != 1.0


def denoise_batch(model: LoadedModel, labels: torch.Tensor, noise: torch.Tensor, settings: SampleSettings,
                  step_callback: Callable | None = None, progress: tqdm | None = None,
                  output_callback: Callable | None = None, grad: bool = False) -> torch.Tensor:
    """Run the scheduler loop on one batch; returns final latents (before any VAE decode).

    ``output_callback(step_index, timestep, x_t, raw_output)`` runs after every model call with the
    transformer's raw output (all CFG rows, all channels): the trace recorder probes from there.
    ``grad=True`` keeps the autograd graph of the whole loop (training a policy through the sampler).
    """
    with torch.set_grad_enabled(grad):
        return _denoise(model, labels, noise, settings, step_callback, progress, output_callback)


def _denoise(model, labels, noise, settings, step_callback, progress, output_callback) -> torch.Tensor:
    transformer = model.transformer
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
    scheduler.set_timesteps(settings.steps, device=noise.device)
    channels = model.latent_shape[0]
    cfg = uses_cfg(settings.guidance_scale)
    class_input = labels.to(noise.device)
    if cfg:  # conditional half first, null-class half second (as DiTPipeline)
        class_input = torch.cat([class_input, model.adapter.null_condition(transformer, class_input)])
    x = noise * scheduler.init_noise_sigma
    runtime = active_runtime(transformer)
    if runtime is not None:
        runtime.begin_call(settings.steps)  # cache state belongs to this batch of this call only
        log_snrs = schedule_log_snrs(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        if runtime is not None:
            runtime.set_step(i, t, log_snrs[i])
        if step_callback is not None:
            step_callback(i, settings.steps, t)
        x_in = torch.cat([x, x]) if cfg else x
        x_in = scheduler.scale_model_input(x_in, t)
        timesteps = t.reshape(1).to(x.device).expand(x_in.shape[0])
        out = model.adapter.denoise(transformer, x_in, timesteps, class_input)
        if output_callback is not None:
            output_callback(i, t, x_in, out)
        eps = out[:, :channels]  # learned-sigma models predict [eps, variance]: keep eps
        if cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + settings.guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
        if progress is not None:
            progress.update(1)
    if runtime is not None:
        runtime.end_call()
    return x


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (identity for pixel-space models)."""
    if model.vae is None:
        return latents.float()
    return model.vae.decode(latents / model.vae.config.scaling_factor).sample.float()


def sample(model: LoadedModel, labels, seeds, settings: SampleSettings, step_callback: Callable | None = None,
           progress: bool = True, batch_callback: Callable | None = None,
           output_callback: Callable | None = None) -> torch.Tensor:
    """Generate one image per (label, seed); returns float images in [-1, 1], [N, C, H, W], on CPU.

    ``batch_callback(start, end)`` runs before each batch (the runtime resets its cache state there).
    """
    settings.validate()
    labels = torch.as_tensor(labels, dtype=torch.long)
    seeds = [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    if len(labels) == 0:
        raise ValueError("nothing to sample: --num-samples must be at least 1")
    if int(labels.min()) < 0 or int(labels.max()) >= model.num_classes:
        raise ValueError(f"class labels must lie in [0, {model.num_classes - 1}]")
    n_batches = (len(seeds) + settings.batch_size - 1) // settings.batch_size
    bar = tqdm(total=n_batches * settings.steps, desc=f"sample {model.name}", unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    images = []
    try:
        for start in range(0, len(seeds), settings.batch_size):
            end = min(start + settings.batch_size, len(seeds))
            if batch_callback is not None:
                batch_callback(start, end)
            noise = initial_noise(seeds[start:end], model.latent_shape, model.dtype, model.device)
            latents = denoise_batch(model, labels[start:end], noise, settings, step_callback, bar, output_callback)
            images.append(decode(model, latents).cpu())
    finally:
        bar.close()
    return torch.cat(images)
