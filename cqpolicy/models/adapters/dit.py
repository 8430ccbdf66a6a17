"""diffusers ``DiTTransformer2DModel`` (facebook/DiT-XL-2-256, the embedded ``fmnist-dit``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cqpolicy.models.adapters.base import TransformerBlocksAdapter, register_adapter


@register_adapter
class DiTAdapter(TransformerBlocksAdapter):
    """diffusers ``DiTTransformer2DModel`` (facebook/DiT-XL-2-256, the embedded ``fmnist-dit``): adaLN-zero
    ``BasicTransformerBlock``s, a label embedding whose last row is the null class."""

    model_class = "DiTTransformer2DModel"
    unit_names = ("attn1", "ff", "block")
    default_units = ("attn1", "ff")
    block_units = ("block",)
    restarts_at_blocks = True

    def denoise(self, model, x, timesteps, cond):
        return model(x, timestep=timesteps, class_labels=cond).sample

    def null_condition(self, model, cond):
        # diffusers' LabelEmbedding appends the CFG null row after the real classes (1000 for ImageNet DiT)
        return torch.full_like(cond, self.num_classes(model))

    def block_input(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden, kwargs.get("timestep"), kwargs.get("class_labels")

    def forward_from_block(self, model, start, inputs):
        """Blocks ``start..L-1``, then the adaLN-zero output head and unpatchify."""

        hidden_states, timestep, class_labels = inputs
        for block in self.blocks(model)[start:]:
            hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=None,
                                  encoder_attention_mask=None, timestep=timestep, cross_attention_kwargs=None,
                                  class_labels=class_labels)
        conditioning = model.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = model.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = model.proj_out_2(hidden_states)
        p, c = model.patch_size, model.out_channels
        side = int(hidden_states.shape[1] ** 0.5)
        hidden_states = hidden_states.reshape(-1, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", hidden_states).reshape(-1, c, side * p, side * p)

    def num_classes(self, model):
        return int(model.config.num_embeds_ada_norm)
