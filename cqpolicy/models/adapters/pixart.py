"""diffusers ``PixArtTransformer2DModel`` (PixArt-α / Σ): DiT blocks with ``ada_norm_single`` and cross-attention."""
from __future__ import annotations

import torch

from cqpolicy.models.adapters.base import TextAdapter, TransformerBlocksAdapter, register_adapter

VAE_SCALE = 8  # pixels per latent cell of PixArt's VAE (its resolution conditions are in pixels)


@register_adapter
class PixArtAdapter(TextAdapter, TransformerBlocksAdapter):
    """``BasicTransformerBlock``s (the DiT block class) with ``norm_type="ada_norm_single"``: self-attention
    ``attn1``, cross-attention to the caption ``attn2``, feed-forward ``ff``, or the whole ``block``'s residual.
    The caption is T5's, with its attention mask; learned sigma (the sampler keeps the first half of the
    channels)."""

    model_class = "PixArtTransformer2DModel"
    unit_names = ("attn1", "attn2", "ff", "block")
    default_units = ("attn1", "attn2", "ff")
    block_units = ("block",)
    cross_attention_units = ("attn2",)
    cond_keys = ("encoder_hidden_states", "encoder_attention_mask")

    def added_conditions(self, model, x):
        """PixArt's micro-conditions: resolution and aspect ratio (used by the 1024-px checkpoints only)."""
        if not model.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        rows = x.shape[0]
        return {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).repeat(rows, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(rows, 1)}

    def denoise(self, model, x, timesteps, cond):
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"],
                     encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=timesteps,
                     added_cond_kwargs=self.added_conditions(model, x)).sample

    def encode_prompts(self, pipeline, prompts, negative, **options):
        embeds, mask, null, null_mask = pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=[negative] * len(prompts),
            device=pipeline.device, clean_caption=False, **options)
        return ({"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
                {"encoder_hidden_states": null[:1], "encoder_attention_mask": null_mask[:1]})
