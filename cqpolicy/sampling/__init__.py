"""The one sampler loop over diffusers schedulers."""
from cqpolicy.sampling.sampler import (
    SCHEDULERS,
    SampleSettings,
    decode,
    denoise_batch,
    initial_noise,
    make_scheduler,
    sample,
)

__all__ = ["SCHEDULERS", "SampleSettings", "decode", "denoise_batch", "initial_noise", "make_scheduler", "sample"]
