"""The step context a policy reads: step index, step count and log-SNR, from the scheduler that drives the run.

Our sampler announces every step (``CacheRuntime.set_step``). Inside a user's own diffusers pipeline nobody does,
so the runtime follows the pipeline's scheduler instead: ``follow_scheduler`` wraps the scheduler's
``set_timesteps`` (every diffusers pipeline calls it once per call, before the loop), and the runtime then knows
the call's timesteps and log-SNRs and matches each model call's ``timestep`` to its step. Both paths compute the
log-SNR with ``schedule_log_snrs``, so a policy sees the same numbers in either.
"""
from __future__ import annotations

import functools
import math


def _as_float(t) -> float:
    return float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)


def schedule_log_snrs(scheduler) -> list[float]:
    """The log-SNR of every entry of ``scheduler.timesteps`` (after ``set_timesteps``), in sampling order:
    ``log(alpha_bar / (1 - alpha_bar))`` of the training noise schedule for DDPM-type schedulers, and
    ``log((1 - sigma)^2 / sigma^2)`` for flow-matching schedulers (``x_t = (1 - sigma) x_0 + sigma noise``)."""
    timesteps = [_as_float(t) for t in scheduler.timesteps]
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        out = []
        for t in timesteps:
            alpha_bar = float(alphas[int(t)])
            out.append(math.log(alpha_bar / (1.0 - alpha_bar)))
        return out
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor sigmas: cqpolicy cannot tell "
                         f"the noise level of its steps")
    out = []
    for sigma in [float(s) for s in sigmas[:len(timesteps)]]:
        sigma = min(max(sigma, 1e-12), 1 - 1e-12)
        out.append(2.0 * math.log((1.0 - sigma) / sigma))
    return out


SCHEDULER_NAMES = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm",
                   "FlowMatchEulerDiscreteScheduler": "flow"}


def scheduler_name(scheduler) -> str:
    """The name cqpolicy's sampler, artifacts and calibrations use for ``scheduler``'s family (its class name
    when the sampler does not drive that family)."""
    return SCHEDULER_NAMES.get(type(scheduler).__name__, type(scheduler).__name__)


class StepPlan:
    """One pipeline call's timesteps and log-SNRs; ``locate`` maps a model call's timestep to its step."""

    def __init__(self, scheduler):
        self.timesteps = [_as_float(t) for t in scheduler.timesteps]
        self.log_snrs = schedule_log_snrs(scheduler)
        self.position = -1  # the step of the last model call; -1 before the first

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def locate(self, t: float) -> int:
        """The step of a model call at timestep ``t``: the next step whose timestep is ``t`` (schedulers that
        call the model twice per step, such as Heun's, list the timestep twice)."""
        for step in range(self.position + 1, len(self.timesteps)):
            if math.isclose(self.timesteps[step], t, rel_tol=1e-6, abs_tol=1e-6):
                self.position = step
                return step
        from cqpolicy.runtime.runtime import StepMismatchError

        raise StepMismatchError(
            f"the model was called at timestep {t:g}, which is not a later step of the {len(self.timesteps)} the "
            f"scheduler set ({self.timesteps[max(self.position, 0)]:g} was step {max(self.position, 0)}): the "
            f"pipeline calls the model outside its scheduler's steps, or once per CFG branch (not supported)")


def follow_scheduler(runtime, scheduler):
    """Make ``runtime`` read every call's steps from ``scheduler``; returns a function that undoes it."""
    original = scheduler.set_timesteps

    @functools.wraps(original)  # pipelines inspect its signature (FLUX passes sigmas only where it is accepted)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        runtime.expect_call(StepPlan(scheduler))
        return result

    scheduler.set_timesteps = set_timesteps  # an instance attribute: the class method stays untouched

    def undo():
        if scheduler.__dict__.get("set_timesteps") is set_timesteps:
            del scheduler.set_timesteps

    return undo
