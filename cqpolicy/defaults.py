"""Every default a run takes when nothing says otherwise, once: the CLI, the configs, the scripts and the API read
them from here.

The embedded models carry their own guidance scale (chosen on model-selection seeds, ``models/fmnist_*.py``);
``GUIDANCE_SCALE`` is for a model that ships none (DiT-XL-2's published setting). ``guidance_for`` is the one place
that resolves "the model's default".
"""
from __future__ import annotations

MODEL = "fmnist-dit"
STEPS = 50  # denoising steps of every command (sampling, tracing, calibration, training, benches)
SCHEDULER = "ddim"
BATCH_SIZE = 64
NUM_SAMPLES = 64
GUIDANCE_SCALE = 4.0
CACHE_FORMAT = "fp16"
GATES_BUDGET_RANGE = (0.15, 0.55)  # MACs fractions of the plain model the gates train for (~1.8x .. 6.7x)


def guidance_for(model, guidance_scale: float | None) -> float:
    """``guidance_scale``, or ``model``'s default (a ``LoadedModel``) when None."""
    return float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
