"""diffusers ``UNet2DConditionModel`` (the Stable Diffusion 1.x / 2.x layout)."""
from __future__ import annotations

from cqpolicy.models.adapters.base import CacheUnit, TextAdapter, register_adapter
from cqpolicy.models.adapters.unet2d import UNet2DAdapter


def _transformer_output(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _pack_transformer_output(tensor, args, kwargs):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return (tensor,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=tensor)


@register_adapter
class UNet2DConditionAdapter(TextAdapter, UNet2DAdapter):
    """Resnet layers and ``Transformer2DModel`` layers (self- and cross-attention to the prompt embedding) at each
    level, the depths of a ``UNet2DModel``; unit ``layer`` is each of them, ``attn2`` the cross-attention inside a
    transformer layer (T-GATE caches it). Sampled with prompt embeddings (``cqpolicy.models.prompts``)."""

    model_class = "UNet2DConditionModel"
    unit_names = ("layer", "attn2")
    default_units = block_units = ("layer",)
    cross_attention_units = ("attn2",)
    condition_kwarg = "encoder_hidden_states"

    def unit(self, block, index, name):
        is_transformer = type(block).__name__ == "Transformer2DModel"
        if name == "layer":
            return CacheUnit(index, name, block, residual=False,
                             flatten=_transformer_output if is_transformer else None,
                             pack=_pack_transformer_output if is_transformer else None)
        if not is_transformer:
            return None
        inner = list(block.transformer_blocks)
        if len(inner) != 1:
            raise ValueError(f"layer {index} stacks {len(inner)} transformer blocks: unit 'attn2' needs one per "
                             f"layer (the SD 1.x / 2.x layout)")
        return CacheUnit(index, name, inner[0].attn2, residual=False)

    def denoise(self, model, x, timesteps, cond):
        return model(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    call_inputs = UNet2DAdapter.call_inputs  # (sample, timestep, encoder_hidden_states), positional or not

    def encode_prompts(self, pipeline, prompts, negative, **options):
        positive, null = pipeline.encode_prompt(prompts, device=pipeline.device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=True,
                                                negative_prompt=[negative] * len(prompts), **options)
        return {"encoder_hidden_states": positive}, {"encoder_hidden_states": null[:1]}

    def unit_patterns(self, names):
        patterns = {"layer": r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+",
                    "attn2": r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.0\.attn2"}
        return [patterns[n] for n in names]
