"""diffusers ``UNet2DModel`` (the google/ddpm-cifar10-32 layout, the embedded ``fmnist-unet``)."""
from __future__ import annotations

import torch

from cqpolicy.models.adapters.base import CacheUnit, ModelAdapter, register_adapter


@register_adapter
class UNet2DAdapter(ModelAdapter):
    """diffusers ``UNet2DModel`` (the google/ddpm-cifar10-32 layout): unconditional, or class-conditional through
    its ``class_embedding``, whose last row is then the classifier-free-guidance null class (``num_class_embeds``
    = classes + 1)."""

    model_class = "UNet2DModel"
    unit_names = default_units = block_units = ("layer",)
    channel_dim = 1  # resnet and attention layers return [B, C, H, W]
    condition_kwarg = "class_labels"  # the keyword the model takes its condition by

    @staticmethod
    def _levels(model):
        """(depth, block) in execution order: down blocks at depth 0.., the mid block deepest, up blocks back up."""
        down, up = list(model.down_blocks), list(model.up_blocks)
        return ([(i, b) for i, b in enumerate(down)] + ([(len(down), model.mid_block)] if model.mid_block else [])
                + [(len(up) - 1 - j, b) for j, b in enumerate(up)])

    @staticmethod
    def _layers(block):
        """A block's resnet and attention layers in the order its forward runs them."""
        resnets = list(getattr(block, "resnets", []))
        attentions = [a for a in getattr(block, "attentions", None) or [] if a is not None]
        if type(block).__name__.startswith("UNetMidBlock"):  # resnet, then (attention, resnet) pairs
            return resnets[:1] + [m for pair in zip(attentions, resnets[1:]) for m in pair]
        return [m for i, r in enumerate(resnets) for m in ([r, attentions[i]] if i < len(attentions) else [r])]

    def blocks(self, model):
        return [layer for _, block in self._levels(model) for layer in self._layers(block)]

    def depths(self, model):
        return [depth for depth, block in self._levels(model) for _ in self._layers(block)]

    def unit(self, block, index, name):
        return CacheUnit(index, name, block, residual=False)

    def denoise(self, model, x, timesteps, cond):
        return self.forward_call(model, (x, timesteps, cond if self.conditional(model) else None))

    def conditional(self, model):
        return bool(model.config.num_class_embeds)

    def null_condition(self, model, cond):
        if not self.conditional(model):
            raise ValueError("an unconditional UNet2DModel has no null condition: sample with --guidance-scale 1")
        return torch.full_like(cond, int(model.config.num_class_embeds) - 1)

    def call_inputs(self, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return x, t, kwargs.get(self.condition_kwarg, args[2] if len(args) > 2 else None)

    def forward_call(self, model, inputs):
        x, t, cond = inputs
        return model(x, t, **{self.condition_kwarg: cond}).sample

    def num_classes(self, model):
        return int(model.config.num_class_embeds) - 1 if self.conditional(model) else 1

    def latent_shape(self, model):
        c = model.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        return (c.in_channels, *((size, size) if isinstance(size, int) else size))

    def unit_patterns(self, names):
        return [r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+"]
