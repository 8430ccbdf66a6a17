"""diffusers ``FluxTransformer2DModel`` (FLUX.1-dev / -schnell): dual-stream then single-stream blocks, packed
latents, flow matching, guidance distilled into the model."""
from __future__ import annotations

import numpy as np
import torch

from cqpolicy.models.adapters.base import CacheUnit, TextAdapter, joint_block, joint_streams, register_adapter
from cqpolicy.models.adapters.sd3 import calculate_shift

PACK = 2  # FLUX packs 2x2 latent cells into one token


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // PACK, w // PACK, d // (PACK * PACK), PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (PACK * PACK), h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The positions of the packed tokens (``FluxPipeline._prepare_latent_image_ids``): [h/2 * w/2, 3]."""
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] += torch.arange(h // PACK)[:, None]
    ids[..., 2] += torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register_adapter
class FluxAdapter(TextAdapter):
    """Dual-stream ``FluxTransformerBlock``s (joint attention ``attn``, image ``ff``, text ``ff_context``) then
    single-stream blocks, each one unit ``single`` (their attention and MLP share one output projection under one
    gate, so only the whole block's residual can be cached); ``block`` is any block's residual. Conditioned on T5
    tokens and CLIP's pooled embedding; FLUX.1-dev takes the guidance scale as an input (no CFG batch),
    FLUX.1-schnell takes none. Its timestep input is the scheduler's divided by 1000."""

    model_class = "FluxTransformer2DModel"
    unit_names = ("attn", "ff", "ff_context", "single", "block")
    default_units = ("attn", "ff", "ff_context", "single")
    block_units = ("block",)
    cond_keys = ("encoder_hidden_states", "pooled_projections", "guidance")

    def blocks(self, model):
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)

    @staticmethod
    def _dual(block) -> bool:
        return type(block).__name__ == "FluxTransformerBlock"

    def unit(self, block, index, name):
        dual = self._dual(block)
        if name == "block" or (name == "single" and not dual):
            source, flatten, pack_ = joint_block(last_only=False)
            return CacheUnit(index, name, block, residual=True, source=source, flatten=flatten, pack=pack_)
        if not dual or name == "single":
            return None
        if name == "attn":
            source, flatten, pack_ = joint_streams("hidden_states", "encoder_hidden_states")
            return CacheUnit(index, name, block.attn, residual=False, source=source, flatten=flatten, pack=pack_)
        return CacheUnit(index, name, getattr(block, name), residual=False)

    def guidance(self, model):
        return "embedded" if model.config.guidance_embeds else "none"

    def denoise(self, model, x, timesteps, cond):
        h, w = x.shape[-2:]
        text = cond["encoder_hidden_states"]
        out = model(hidden_states=pack(x), timestep=timesteps.to(x.dtype) / 1000, guidance=cond.get("guidance"),
                    pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
                    img_ids=image_ids(h, w, x.device, x.dtype)).sample
        return unpack(out, h, w)

    def call_timestep(self, args, kwargs):
        return super().call_timestep(args, kwargs) * 1000

    def call_inputs(self, args, kwargs):
        ids = kwargs["img_ids"]
        h, w = (int(ids[:, 1].max()) + 1) * PACK, (int(ids[:, 2].max()) + 1) * PACK
        return (unpack(kwargs["hidden_states"], h, w), kwargs["timestep"] * 1000,
                *(kwargs.get(k) for k in self.cond_keys))

    def set_timesteps(self, model, scheduler, steps, latent_shape, device=None):
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        seq_len = (latent_shape[-2] // PACK) * (latent_shape[-1] // PACK)
        config = {"max_shift": 1.15, **scheduler.config}
        scheduler.set_timesteps(steps if sigmas is None else None, device=device, sigmas=sigmas,
                                mu=calculate_shift(seq_len, config))

    def encode_prompts(self, pipeline, prompts, negative, **options):
        embeds, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=None, device=pipeline.device,
                                                   num_images_per_prompt=1, **options)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None

    def latent_shape(self, model):
        return (model.config.in_channels // (PACK * PACK), 128, 128)  # FluxPipeline's default 1024 x 1024

    def num_heads(self, model):
        return getattr(model.config, "num_attention_heads", None)

    def unit_patterns(self, names):
        patterns = {"attn": r"transformer_blocks\.\d+\.attn", "ff": r"transformer_blocks\.\d+\.ff",
                    "ff_context": r"transformer_blocks\.\d+\.ff_context",
                    "single": r"single_transformer_blocks\.\d+",
                    "block": r"(single_)?transformer_blocks\.\d+"}
        return [patterns[n] for n in names]
