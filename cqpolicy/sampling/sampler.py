"""The one denoising loop: diffusers schedulers, batched classifier-free guidance, per-sample seeds.

Every model run in cqpolicy (plain sampling, tracing, benchmarking) goes through ``sample``. Sample ``i``
always starts from the noise of ``torch.Generator().manual_seed(seeds[i])``, so a sample is the same
whatever batch it falls in. ``step_callback(step_index, num_steps, timestep)`` runs before every model
call: the runtime uses it to learn the step it is in.

Schedulers: DDIM and DPM-Solver++ for noise-prediction models, flow-matching Euler (with the pipeline's shift or
dynamic shifting, ``adapter.set_timesteps``) for flow models (SD3, FLUX); the model's scheduler config says
which family it was trained for. Conditions: class labels, or prompt ids into ``model.prompts`` (text-conditioned
models, whose unconditional branch is the encoded negative prompt). Guidance: a batched CFG branch, conditional
rows first; a guidance-distilled model (FLUX.1-dev) takes the scale as an input instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from cqpolicy import defaults
from cqpolicy.models.loading import LoadedModel
from cqpolicy.runtime.context import SCHEDULER_NAMES, schedule_log_snrs
from cqpolicy.runtime.runtime import active_runtime

SCHEDULERS = ("ddim", "dpm", "flow")


def is_flow_matching(config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one (the model predicts a velocity, not noise); a config read
    from a live scheduler has no class name, but a flow-matching one has a shift and no beta schedule."""
    if "_class_name" in config:
        return str(config["_class_name"]).startswith("FlowMatch")
    return "shift" in config and "beta_start" not in config


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of family ``name`` built from the model's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    if (name == "flow") != is_flow_matching(config):
        trained = "flow matching (--scheduler flow)" if is_flow_matching(config) else "noise prediction (ddim or dpm)"
        raise ValueError(f"scheduler {name!r} does not fit this model: it was trained for {trained}")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def scheduler_for(model: LoadedModel, name: str | None) -> str:
    """``name``, or when None the model's own: its pipeline's scheduler where the sampler drives that family
    (PixArt ships DPM-Solver++), flow matching for a flow model, else the default."""
    if name is not None:
        return name
    if is_flow_matching(model.scheduler_config):
        return "flow"
    return SCHEDULER_NAMES.get(str(model.scheduler_config.get("_class_name")), defaults.SCHEDULER)


def set_timesteps(model: LoadedModel, scheduler, steps: int, device=None) -> None:
    model.adapter.set_timesteps(model.transformer, scheduler, int(steps), model.latent_shape, device)


def initial_noise(seeds: list[int], shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """One independent noise tensor per seed, stacked: independent of the batch a sample lands in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
                       ).to(device=device, dtype=dtype)


def step_log_snrs(model: LoadedModel, settings: "SampleSettings") -> list[float]:
    """The log-SNR of every step of a run with ``settings``, in sampling order (what ``set_step`` reports)."""
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
    set_timesteps(model, scheduler, settings.steps)
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


def settings_for(model: LoadedModel, steps: int = defaults.STEPS, scheduler: str | None = None,
                 batch_size: int = defaults.BATCH_SIZE, guidance_scale: float | None = None) -> SampleSettings:
    """Validated settings for ``model`` (``scheduler`` / ``guidance_scale`` None: the model's default)."""
    settings = SampleSettings(steps=steps, scheduler=scheduler_for(model, scheduler), batch_size=batch_size,
                              guidance_scale=defaults.guidance_for(model, guidance_scale))
    settings.validate()
    check_guidance(model, settings.guidance_scale)
    return settings


def check_guidance(model: LoadedModel, guidance_scale: float) -> None:
    if model.adapter.guidance(model.transformer) == "none" and guidance_scale != 1.0:
        why = ("no guidance input: it is guidance-distilled, like FLUX.1-schnell"
               if model.adapter.conditional(model.transformer) else "no null condition: it is unconditional")
        raise ValueError(f"{model.name} takes no guidance ({model.adapter.model_class} with {why}): use "
                         f"--guidance-scale 1")


def uses_cfg(guidance_scale: float, model: LoadedModel | None = None) -> bool:
    """Whether a run at ``guidance_scale`` batches an unconditional branch (never for a model that takes the scale
    as an input)."""
    if model is not None and model.adapter.guidance(model.transformer) != "cfg":
        return False
    return guidance_scale != 1.0


def cat_conditions(a, b):
    """Two condition batches stacked (class-label tensors, or prompt-embedding dicts key by key)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


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
    set_timesteps(model, scheduler, settings.steps, noise.device)
    channels = model.latent_shape[0]
    check_guidance(model, settings.guidance_scale)
    cfg = uses_cfg(settings.guidance_scale, model)
    condition = model.condition(labels.to(noise.device))
    if cfg:  # conditional half first, null half second (as DiTPipeline)
        condition = cat_conditions(condition, model.null_condition(condition, len(labels)))
    if model.adapter.guidance(transformer) == "embedded":
        condition = {**condition, "guidance": torch.full((len(labels),), float(settings.guidance_scale),
                                                         device=noise.device)}
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
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
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        timesteps = t.reshape(1).to(x.device).expand(x_in.shape[0])
        out = model.adapter.denoise(transformer, x_in, timesteps, condition)
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
    config = model.vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return model.vae.decode(latents).sample.float()


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
        what = "prompt ids" if model.adapter.text_conditioned else "class labels"
        raise ValueError(f"{what} must lie in [0, {model.num_classes - 1}]")
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
