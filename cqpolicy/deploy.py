"""``cqpolicy.enable`` on a user's own diffusers pipeline or its denoiser: what the sampler gives a policy, given.

A pipeline (anything with a ``scheduler`` and a ``transformer`` or ``unet``) is followed through its scheduler:
every call's step, step count and log-SNR come from the timesteps the pipeline sets, as in cqpolicy's sampler.
Before the hooks go in, the policy is prepared for the run as the sampler's callers prepare it: calibrating
families (SmoothCache, DPS, ReCaT) calibrate, learned artifacts are checked against the model's class, depth,
weights, step count and scheduler, and gates plan their schedule. The step count and guidance scale of that
run are ``steps`` / ``guidance_scale`` when given, else the defaults of the pipeline's ``__call__``.

A bare denoiser has no scheduler to follow (pass ``scheduler=`` to give it one): the runtime then infers steps
from the timestep argument, policies are not prepared, and a policy that needs the step count or the noise
schedule (a learned MLP, gates, the calibrating families) raises instead of guessing.
"""
from __future__ import annotations

import torch

from cqpolicy import defaults

DENOISERS = ("transformer", "unet")


def split_pipeline(target):
    """``(denoiser, pipeline or None)`` for a diffusers pipeline or a bare denoiser module."""
    if isinstance(target, torch.nn.Module):
        return target, None
    for name in DENOISERS:
        denoiser = getattr(target, name, None)
        if isinstance(denoiser, torch.nn.Module) and getattr(target, "scheduler", None) is not None:
            return denoiser, target
    raise TypeError(f"cqpolicy.enable takes a diffusers pipeline (with a scheduler and a transformer or unet) or "
                    f"its denoiser module, got {type(target).__name__}")


def _call_default(pipeline, name: str):
    from cqpolicy.models.loading import pipeline_default

    return None if pipeline is None else pipeline_default(type(pipeline), name)


def model_view(denoiser, scheduler, pipeline=None, guidance_scale: float | None = None, prompts=None,
               negative_prompt: str = ""):
    """The ``LoadedModel`` a policy's ``prepare`` reads: the pipeline's default resolution, and for a text model
    ``prompts`` (a ``Prompts`` table, or texts the pipeline's own text encoders encode) to calibrate on."""
    from cqpolicy.models.loading import LoadedModel
    from cqpolicy.models.prompts import Prompts, encode_prompts

    name = (getattr(pipeline, "name_or_path", None) or getattr(denoiser, "name_or_path", None)
            or type(denoiser).__name__)
    guidance = defaults.GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale)
    size = getattr(pipeline, "default_sample_size", None)
    model = LoadedModel(str(name), denoiser, {**scheduler.config, "_class_name": type(scheduler).__name__},
                        getattr(pipeline, "vae", None), default_guidance_scale=guidance,
                        latent_size=(int(size), int(size)) if size else None)
    if prompts is not None:
        if not isinstance(prompts, Prompts):
            if pipeline is None:
                raise ValueError("cqpolicy.enable: prompt texts need the pipeline's text encoders; give a Prompts")
            prompts = encode_prompts(pipeline, model.adapter, [prompts] if isinstance(prompts, str) else prompts,
                                     negative_prompt)
        model.use_prompts(prompts)
    return model


def enable(target, policy, cache_format="fp16", compile: bool = False, *, steps: int | None = None,
           guidance_scale: float | None = None, scheduler=None, prompts=None, negative_prompt: str = ""):
    """Hook ``policy`` (a Policy or a spec string) into ``target`` (a pipeline or its denoiser); returns the
    runtime handle (``with``-able; ``handle.disable()`` removes everything). ``prompts``: what a calibrating
    policy samples a text-conditioned model with (texts, or a ``cqpolicy.models.prompts.Prompts``). See the
    module doc."""
    from cqpolicy.models.adapters import adapter_for
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import enable as enable_runtime
    from cqpolicy.runtime.context import scheduler_name
    from cqpolicy.sampling.sampler import SampleSettings

    denoiser, pipeline = split_pipeline(target)
    scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
    if isinstance(policy, str):
        policy = make_policy(policy)
    if scheduler is not None:
        steps = steps if steps is not None else _call_default(pipeline, "num_inference_steps")
        if steps is None:
            raise ValueError("cqpolicy.enable: give steps= (the number of inference steps the pipeline will run)")
        guidance = guidance_scale if guidance_scale is not None else _call_default(pipeline, "guidance_scale")
        if adapter_for(denoiser).guidance(denoiser) == "none":
            guidance = 1.0  # the pipeline's scale is ignored by a model that takes no guidance (FLUX.1-schnell)
        settings = SampleSettings(steps=int(steps), scheduler=scheduler_name(scheduler),
                                  guidance_scale=1.0 if guidance is None else float(guidance))
        policy.prepare(model_view(denoiser, scheduler, pipeline, guidance, prompts, negative_prompt), settings)
    handle = enable_runtime(denoiser, policy, cache_format, compile)
    if scheduler is not None:
        handle.follow_scheduler(scheduler)
    return handle
