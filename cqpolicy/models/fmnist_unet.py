"""The embedded ``fmnist-unet`` model: a small class-conditional UNet for Fashion-MNIST.

It is the same diffusers class as google/ddpm-cifar10-32 (``UNet2DModel``: resnet levels joined by skip
connections, attention at the lowest resolution and in the mid block), narrower, on 28x28 pixels
(28 -> 14 -> 7), with a class embedding whose last row is the null class for classifier-free guidance. It
shares ``fmnist-dit``'s noise schedule, so the two models' rows compare step for step.
"""
from __future__ import annotations

from pathlib import Path

from cqpolicy.models import fmnist_dit

NAME = "fmnist-unet"
NUM_CLASSES = 10
SHIPPED_DIR = Path(__file__).parent / "fmnist-unet"
FOLDER = "unet"  # the denoiser's folder in the diffusers pipeline layout

UNET_CONFIG = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
    num_class_embeds=NUM_CLASSES + 1,  # the last row is the null class
)
SCHEDULER_CONFIG = fmnist_dit.SCHEDULER_CONFIG
# UNet2DModel's class embedding drops no labels itself: training swaps this share for the null class
LABEL_DROPOUT = 0.1
DEFAULT_GUIDANCE_SCALE = 1.5  # lowest FID on 500 model-selection samples (docs/results/fmnist-unet/guidance.md)


def build_denoiser():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


build_scheduler = fmnist_dit.build_scheduler
