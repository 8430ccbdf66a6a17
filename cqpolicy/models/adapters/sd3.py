"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5): MMDiT joint blocks, flow matching."""
from __future__ import annotations

from cqpolicy.models.adapters.base import (CacheUnit, TextAdapter, TransformerBlocksAdapter, joint_block,
                                           joint_streams, register_adapter)


def calculate_shift(seq_len: int, config) -> float:
    """The dynamic-shifting ``mu`` of a flow-matching scheduler for ``seq_len`` image tokens (as the pipelines)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + base - slope * base_len


@register_adapter
class SD3Adapter(TextAdapter, TransformerBlocksAdapter):
    """``JointTransformerBlock``s: one joint attention ``attn`` over image and text tokens (the unit is both of its
    outputs), the image feed-forward ``ff`` and the text one ``ff_context`` (absent from the last,
    ``context_pre_only`` block), SD3.5's second image self-attention ``attn2`` on its dual-attention layers, or the
    whole ``block``'s residual over both streams. Conditioned on the joint text embedding and the pooled one."""

    model_class = "SD3Transformer2DModel"
    unit_names = ("attn", "attn2", "ff", "ff_context", "block")
    default_units = ("attn", "ff", "ff_context")  # attn2 exists on SD3.5's dual-attention layers only: opt in
    block_units = ("block",)
    cond_keys = ("encoder_hidden_states", "pooled_projections")

    def unit(self, block, index, name):
        if name == "block":
            source, flatten, pack = joint_block(last_only=bool(block.context_pre_only))
            return CacheUnit(index, name, block, residual=True, source=source, flatten=flatten, pack=pack)
        if name == "attn":
            source, flatten, pack = joint_streams("hidden_states", "encoder_hidden_states")
            return CacheUnit(index, name, block.attn, residual=False, source=source, flatten=flatten, pack=pack)
        return super().unit(block, index, name)

    def denoise(self, model, x, timesteps, cond):
        return model(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"]).sample

    def set_timesteps(self, model, scheduler, steps, latent_shape, device=None):
        if scheduler.config.get("use_dynamic_shifting", False):
            p = model.config.patch_size
            seq_len = (latent_shape[-2] // p) * (latent_shape[-1] // p)
            scheduler.set_timesteps(steps, device=device, mu=calculate_shift(seq_len, scheduler.config))
        else:
            scheduler.set_timesteps(steps, device=device)

    def encode_prompts(self, pipeline, prompts, negative, **options):
        embeds, null, pooled, null_pooled = pipeline.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=pipeline.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=[negative] * len(prompts), **options)
        return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                {"encoder_hidden_states": null[:1], "pooled_projections": null_pooled[:1]})
