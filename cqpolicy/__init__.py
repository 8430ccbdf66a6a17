"""cqpolicy: learn when a diffusion model may skip work."""
__version__ = "0.1.0"


def enable(model, policy, cache_format="fp16", compile=False):
    """Hook a reuse ``policy`` (a Policy or a spec string) into a diffusers ``model``; see runtime.enable."""
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import enable as _enable

    if isinstance(policy, str):
        policy = make_policy(policy)
    return _enable(model, policy, cache_format, compile)
