"""The embedded ``fmnist-dit`` model: a small class-conditional DiT for Fashion-MNIST.

It is the same diffusers class as facebook/DiT-XL-2-256 (``DiTTransformer2DModel``, adaLN-zero blocks,
label embedding with a null class for classifier-free guidance), only narrower and on 28x28 pixels, so
one adapter and one runtime serve both.
"""
from __future__ import annotations

from pathlib import Path

NAME = "fmnist-dit"
NUM_CLASSES = 10
SHIPPED_DIR = Path(__file__).parent / "fmnist-dit"
FOLDER = "transformer"  # the denoiser's folder in the diffusers pipeline layout

TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,  # width 128
    in_channels=1,
    out_channels=1,  # plain epsilon prediction (no learned sigma)
    num_layers=12,
    sample_size=28,
    patch_size=4,  # 7x7 = 49 tokens
    num_embeds_ada_norm=NUM_CLASSES,  # label table holds NUM_CLASSES + 1 rows: the last is the null class
    norm_type="ada_norm_zero",
)

# DiT's own training schedule (linear betas, 1000 steps, epsilon prediction).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    timestep_spacing="leading",
)

# diffusers' LabelEmbedding drops 10% of labels to the null class itself in train mode: nothing to add
LABEL_DROPOUT = 0.0
DEFAULT_GUIDANCE_SCALE = 2.0


def build_denoiser():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)
