"""cqpolicy: learn when a diffusion model may skip work."""
__version__ = "0.1.0"


def enable(target, policy, cache_format="fp16", compile=False, *, steps=None, guidance_scale=None, scheduler=None,
           prompts=None, negative_prompt=""):
    """Hook a reuse ``policy`` (a Policy or a spec string) into a diffusers pipeline or its denoiser; see
    ``cqpolicy.deploy`` (a pipeline gives the policy its steps, step count and log-SNR, and prepares it;
    ``prompts`` are what a calibrating policy samples a text-conditioned model with)."""
    from cqpolicy.deploy import enable as _enable

    return _enable(target, policy, cache_format, compile, steps=steps, guidance_scale=guidance_scale,
                   scheduler=scheduler, prompts=prompts, negative_prompt=negative_prompt)
