"""Model adapters: what the runtime, sampler, recorder and costs need to know about one diffusers model family.

One ``ModelAdapter`` per model class, registered by class name (as diffusers keeps block metadata per class in
``hooks/_helpers.py``). It answers where the cache units are and what kind each is, how to call the denoiser
(``x, t, cond`` and the classifier-free-guidance null condition), which rows of a call are the unconditional
branch, and how to run the model from a block onward (the trace recorder's probes). Nothing outside
``cqpolicy.models`` names a model family's modules.

A *cache unit* is a submodule whose output the runtime may replace by a cached one. For diffusers DiT blocks
(``BasicTransformerBlock`` with adaLN-zero) they are the self-attention ``attn1`` and the feed-forward ``ff``
(their outputs come before the adaLN gate and the residual, so a reused output is still gated by the current
step's conditioning), or the whole ``block`` (its residual ``output - input`` is cached). For a ``UNet2DModel``
every resnet and attention layer is a block with one unit, ``layer``, whose output is cached; each layer has a
depth (its down / up level, the mid block deepest), which DeepCache's skip branch refers to. A
``UNet2DConditionModel`` (Stable Diffusion) is laid out the same way, its attention layers being
``Transformer2DModel``s with cross-attention to the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

UNIT_NAMES = ("attn1", "ff", "block", "layer")  # every family's unit kinds; each adapter has a subset


@dataclass(frozen=True)
class CacheUnit:
    block: int
    name: str
    module: torch.nn.Module
    residual: bool  # cache output - first input (whole blocks) rather than the output itself
    # for modules returning a tuple or diffusers output (the tensor first): wraps the tensor as the module would
    pack: Callable[[torch.Tensor, dict], object] | None = None


class NoCacheUnitsError(ValueError):
    """The model has no blocks the runtime recognises."""


class ModelAdapter:
    """The interface; one subclass per model family, registered with ``@register_adapter``."""

    model_class: str = ""  # the diffusers class name it serves
    unit_names: tuple[str, ...] = ()
    default_units: tuple[str, ...] = ()  # what a policy that names no units (``none``, ``fora``) hooks
    block_units: tuple[str, ...] = ()  # the units that are whole blocks (TeaCache skips those)
    channel_dim: int = -1  # the channel axis of a unit's output (per-channel corrections of cached outputs)

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks whose units the runtime hooks, in execution order (a unit's ``block`` indexes this)."""
        raise NotImplementedError

    def unit(self, block: torch.nn.Module, index: int, name: str) -> CacheUnit:
        raise NotImplementedError

    def denoise(self, model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """The raw model output for inputs ``x`` at ``timesteps`` under condition ``cond`` (all channels)."""
        raise NotImplementedError

    def null_condition(self, model: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
        """The condition of the unconditional classifier-free-guidance branch, one row per row of ``cond``."""
        raise NotImplementedError

    def unconditional_rows(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """From the arguments of a model call: int8 per row, 1 = the row was fed the null condition, so it is the
        unconditional branch (works inside an unmodified pipeline too); None: no condition to tell by."""
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        if not torch.is_tensor(labels) or not self.conditional(model):
            return None
        return (labels == self.null_condition(model, labels)).to(torch.int8)

    # The trace recorder's probes rerun the model with one unit forced to reuse. A family whose blocks form one
    # chain restarts from the probed block's input (``block_input`` / ``forward_from_block``); any other (a UNet,
    # whose skip connections leave no single input to restart from) reruns the whole call (``call_inputs`` /
    # ``forward_call``) with the units before the probed one fed their outputs of the call.
    restarts_at_blocks: bool = False

    def block_input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """From a block call: the tensors ``forward_from_block`` restarts from (hidden states first)."""
        raise NotImplementedError

    def forward_from_block(self, model: torch.nn.Module, start: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The rest of a model call from block ``start``'s input; equals the model's output when fed that input."""
        raise NotImplementedError

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, ...]:
        """From a model call: the inputs ``forward_call`` takes (latents first; None where absent)."""
        raise NotImplementedError

    def forward_call(self, model: torch.nn.Module, inputs: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """The raw model output for ``call_inputs``."""
        raise NotImplementedError

    @staticmethod
    def is_attention(module: torch.nn.Module) -> bool:
        """Whether ``module`` is a diffusers self-attention whose entropy the recorder can measure."""
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention) and not module.is_cross_attention

    def num_classes(self, model: torch.nn.Module) -> int:
        raise NotImplementedError

    def latent_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def depths(self, model: torch.nn.Module) -> list[int] | None:
        """Per block, its depth in a UNet (0 = the shallowest level, the mid block deepest); None: not a UNet."""
        return None

    def conditional(self, model: torch.nn.Module) -> bool:
        """Whether the model takes a condition with a null value (classifier-free guidance is possible)."""
        return True

    def num_heads(self, model: torch.nn.Module) -> int | None:
        """Attention heads of the cached tensors' last dimension (per-head cache formats), if any."""
        return None

    def unit_patterns(self, names: tuple[str, ...]) -> list[str]:
        """Regular expressions of the units' module names (for peer engines that select modules by name)."""
        raise NotImplementedError


_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[cls.model_class] = cls()
    return cls


def supported_classes() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_for(model: torch.nn.Module | type | str) -> ModelAdapter:
    """The adapter of ``model`` (a module, its class or its class name); one-line error when none claims it."""
    name = model if isinstance(model, str) else (model if isinstance(model, type) else type(model)).__name__
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        raise NoCacheUnitsError(f"no cqpolicy adapter for {name}: no cache units to hook (supported: "
                                f"{', '.join(supported_classes())})")
    return adapter


def cache_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = adapter_for(model).blocks(model)
    if not blocks:
        raise NoCacheUnitsError(f"{type(model).__name__} has no blocks: no cache units to hook")
    return blocks


def find_cache_units(model: torch.nn.Module, names: tuple[str, ...]) -> list[CacheUnit]:
    adapter = adapter_for(model)
    unknown = set(names) - set(adapter.unit_names)
    if unknown:
        raise ValueError(f"unknown cache unit(s) {sorted(unknown)} for {adapter.model_class}; choose from "
                         f"{', '.join(adapter.unit_names)}")
    return [adapter.unit(block, i, name) for i, block in enumerate(cache_blocks(model)) for name in names]


def parse_units(text: str, family: str, field: str = "units") -> tuple[str, ...]:
    """``'attn1+ff'`` -> ``('attn1', 'ff')``; ``''`` -> ``()`` (the model family's default units, which the
    runtime takes from the adapter); one-line ValueError naming the policy family otherwise."""
    if text == "":
        return ()
    parts = tuple(text.split("+"))
    if any(p not in UNIT_NAMES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"policy {family!r}: {field} must be distinct '+'-joined names from "
                         f"{', '.join(UNIT_NAMES)}, got {text!r}")
    return parts


@register_adapter
class DiTAdapter(ModelAdapter):
    """diffusers ``DiTTransformer2DModel`` (facebook/DiT-XL-2-256, the embedded ``fmnist-dit``): adaLN-zero
    ``BasicTransformerBlock``s, a label embedding whose last row is the null class."""

    model_class = "DiTTransformer2DModel"
    unit_names = ("attn1", "ff", "block")
    default_units = ("attn1", "ff")
    block_units = ("block",)
    restarts_at_blocks = True

    def blocks(self, model):
        blocks = getattr(model, "transformer_blocks", None)
        return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []

    def unit(self, block, index, name):
        if name == "block":
            return CacheUnit(index, name, block, residual=True)
        module = getattr(block, name, None)
        if module is None:
            raise NoCacheUnitsError(f"block {index} ({type(block).__name__}) has no {name!r} submodule")
        return CacheUnit(index, name, module, residual=False)

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
        import torch.nn.functional as F

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

    def latent_shape(self, model):
        c = model.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def num_heads(self, model):
        return getattr(model.config, "num_attention_heads", None)

    def unit_patterns(self, names):
        return [rf"transformer_blocks\.\d+\.{name}" if name != "block" else r"transformer_blocks\.\d+"
                for name in names]


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


def _pack_transformer_output(out: torch.Tensor, kwargs: dict):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return (out,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=out)


@register_adapter
class UNet2DConditionAdapter(UNet2DAdapter):
    """diffusers ``UNet2DConditionModel`` (the Stable Diffusion layout): resnet layers and ``Transformer2DModel``
    layers (self- and cross-attention to the prompt embedding) at each level, the same depths as a
    ``UNet2DModel``. Its condition is a prompt embedding and its null condition the negative prompt's, which only
    the pipeline knows: run it inside its diffusers pipeline with ``cqpolicy.enable(pipe.unet, policy)``."""

    model_class = "UNet2DConditionModel"
    condition_kwarg = "encoder_hidden_states"

    def unit(self, block, index, name):
        returns_tuple = type(block).__name__ == "Transformer2DModel"
        return CacheUnit(index, name, block, residual=False, pack=_pack_transformer_output if returns_tuple else None)

    def conditional(self, model):
        return True

    def null_condition(self, model, cond):
        raise ValueError("a UNet2DConditionModel's null condition is its pipeline's negative prompt embedding: run "
                         "it inside its diffusers pipeline (cqpolicy.enable(pipe.unet, policy))")

    def unconditional_rows(self, model, args, kwargs):
        return None  # a pipeline stacks negative and positive prompt embeddings: nothing marks which is which

    def num_classes(self, model):
        raise ValueError("a UNet2DConditionModel is conditioned on prompts, not classes: run it inside its "
                         "diffusers pipeline (cqpolicy.enable(pipe.unet, policy))")
