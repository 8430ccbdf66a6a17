"""The adapter interface: what the runtime, sampler, recorder and costs need to know about one diffusers model family.

One ``ModelAdapter`` per model class, one file each in this package, registered by class name (as diffusers keeps
block metadata per class in ``hooks/_helpers.py``). It answers where the cache units are and what kind each is,
how to call the denoiser (``x, t, cond`` and the classifier-free-guidance null condition), which rows of a call
are the unconditional branch, and how to run the model from a block onward (the trace recorder's probes). Nothing
outside ``cqpolicy.models`` names a model family's modules.

A *cache unit* is a submodule whose output the runtime may replace by a cached one: a block's attention or
feed-forward (their outputs come before the block's gate and residual, so a reused output is still gated by the
current step's conditioning), a whole block (its residual ``output - input`` is cached), or a UNet layer. A unit
whose module maps several tensors to several (the two token streams of SD3's and FLUX's joint blocks) is seen by
the runtime as one tensor: ``source`` / ``flatten`` / ``pack`` join the streams along the token axis and split
them back, so every policy and cache format works on it unchanged.

Conditions: a class-conditional model takes a tensor of class labels; a text-conditioned one a dict of the
keyword tensors its forward takes (``encoder_hidden_states``, pooled projections, masks), one row per sample,
built by ``cqpolicy.models.prompts`` from the pipeline's own text encoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# every family's unit kinds (each adapter has a subset); new kinds go last: trained artifacts order units by this
UNIT_NAMES = ("attn1", "ff", "block", "layer",
              "attn2",  # cross-attention to the prompt (PixArt, Stable Diffusion)
              "attn",  # joint attention over image and text tokens (SD3, FLUX dual-stream blocks)
              "ff_context",  # the text stream's feed-forward of a joint block
              "single")  # a FLUX single-stream block as a whole (attention and MLP share one output projection)


@dataclass(frozen=True)
class CacheUnit:
    block: int
    name: str
    module: torch.nn.Module
    residual: bool  # cache output - input (whole blocks) rather than the output itself
    # modules that do not map one tensor to one tensor: the input as one tensor (a residual's base and what a
    # policy reads), the output as one tensor, and that tensor back as the module's output (two token streams,
    # a diffusers output object). None: the first positional argument / hidden_states, and the output itself.
    source: Callable[[tuple, dict], torch.Tensor] | None = None
    flatten: Callable[[object], torch.Tensor] | None = None
    pack: Callable[[torch.Tensor, tuple, dict], object] | None = None

    def input_of(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.source is not None:
            return self.source(args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


class NoCacheUnitsError(ValueError):
    """The model has no blocks the runtime recognises."""


class ModelAdapter:
    """The interface; one subclass per model family, registered with ``@register_adapter``."""

    model_class: str = ""  # the diffusers class name it serves
    unit_names: tuple[str, ...] = ()
    default_units: tuple[str, ...] = ()  # what a policy that names no units (``none``, ``fora``) hooks
    block_units: tuple[str, ...] = ()  # the units that are whole blocks (TeaCache skips those)
    channel_dim: int = -1  # the channel axis of a unit's output (per-channel corrections of cached outputs)
    cross_attention_units: tuple[str, ...] = ()  # units that attend to the prompt only (T-GATE caches them)
    text_conditioned: bool = False  # conditions are prompt embeddings (``cqpolicy.models.prompts``), not labels

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks whose units the runtime hooks, in execution order (a unit's ``block`` indexes this)."""
        raise NotImplementedError

    def unit(self, block: torch.nn.Module, index: int, name: str) -> CacheUnit | None:
        """Unit ``name`` of block ``index``; None where this block has no such unit (SD3's last block has no
        ``ff_context``, FLUX's single-stream blocks no ``attn``)."""
        raise NotImplementedError

    def denoise(self, model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """The raw model output for inputs ``x`` at ``timesteps`` under condition ``cond`` (all channels)."""
        raise NotImplementedError

    def null_condition(self, model: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
        """The condition of the unconditional classifier-free-guidance branch, one row per row of ``cond``
        (class-conditional models; a text model's is its encoded negative prompt, ``Prompts.null``)."""
        raise NotImplementedError

    def guidance(self, model: torch.nn.Module) -> str:
        """How the model is guided: ``"cfg"`` (a batched unconditional branch), ``"embedded"`` (a guidance-distilled
        model takes the scale as an input, FLUX.1-dev) or ``"none"`` (no guidance at all)."""
        return "cfg" if self.conditional(model) else "none"

    def call_timestep(self, args: tuple, kwargs: dict) -> float:
        """The scheduler timestep of a model call (what ``scheduler.timesteps`` lists), from its arguments."""
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise RuntimeError("cqpolicy runtime: the model was called without a timestep")
        return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)

    def set_timesteps(self, model: torch.nn.Module, scheduler, steps: int, latent_shape: tuple[int, ...],
                      device=None) -> None:
        """Set ``scheduler``'s timesteps for ``steps`` steps as the model's diffusers pipeline does."""
        scheduler.set_timesteps(steps, device=device)

    def encode_prompts(self, pipeline, prompts: list[str], negative: str, **options) -> tuple[dict, dict]:
        """``(rows, null)``: the condition dicts of ``prompts`` (one row each) and of ``negative`` (one row),
        encoded by ``pipeline``'s own ``encode_prompt`` with ``options`` (text-conditioned models)."""
        raise ValueError(f"{self.model_class} is not conditioned on prompts")

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
    units = [adapter.unit(block, i, name) for i, block in enumerate(cache_blocks(model)) for name in names]
    units = [u for u in units if u is not None]
    if not units:
        raise NoCacheUnitsError(f"{adapter.model_class} has no {'+'.join(names)} units")
    return units


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


class TransformerBlocksAdapter(ModelAdapter):
    """Shared by the families whose blocks are ``model.transformer_blocks`` over square latents (DiT, PixArt, SD3):
    a unit is the block submodule of its name, ``block`` the whole block's residual."""

    def blocks(self, model):
        blocks = getattr(model, "transformer_blocks", None)
        return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []

    def unit(self, block, index, name):
        if name == "block":
            return CacheUnit(index, name, block, residual=True)
        module = getattr(block, name, None)
        return None if module is None else CacheUnit(index, name, module, residual=False)

    def latent_shape(self, model):
        c = model.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def num_heads(self, model):
        return getattr(model.config, "num_attention_heads", None)

    def unit_patterns(self, names):
        return [rf"transformer_blocks\.\d+\.{name}" if name != "block" else r"transformer_blocks\.\d+"
                for name in names]


class TextAdapter(ModelAdapter):
    """Shared by the text-conditioned families: a condition is a dict of the keyword tensors ``cond_keys`` the
    denoiser takes (one row per sample), the null condition is the encoded negative prompt (the sampler takes it
    from ``Prompts.null``), and the trace recorder reruns a whole call from its keyword arguments."""

    text_conditioned = True
    cond_keys: tuple[str, ...] = ("encoder_hidden_states",)

    def conditional(self, model):
        return True

    def num_classes(self, model):
        raise ValueError(f"a {self.model_class} is conditioned on prompts, not classes: give prompts (--prompts FILE, "
                         f"one per line, or --prompt-embeds FILE.safetensors)")

    def null_condition(self, model, cond):
        raise ValueError(f"a {self.model_class}'s null condition is its encoded negative prompt (Prompts.null)")

    def unconditional_rows(self, model, args, kwargs):
        return None  # pipelines stack negative and positive prompt embeddings: nothing marks which is which

    def call_inputs(self, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        return (x, t, *(kwargs.get(k) for k in self.cond_keys))

    def forward_call(self, model, inputs):
        x, t, *cond = inputs
        return self.denoise(model, x, t, dict(zip(self.cond_keys, cond)))


def joint_streams(first: str, second: str):
    """``source``, ``flatten``, ``pack`` of a (non-residual) unit whose module takes keyword tensors ``first`` and
    ``second`` ([B, tokens, D] each) and returns the two streams in that order: its output is one tensor, ``first``'s
    tokens then ``second``'s, and a missing (None) ``second`` output is left out and put back. Its input is
    ``first`` alone: what a policy reads of it, without a copy of both streams at every call."""

    def source(args, kwargs):
        return kwargs[first]

    def flatten(out):
        return out[0] if out[1] is None else torch.cat([out[0], out[1]], dim=1)

    def pack(tensor, args, kwargs):
        n = kwargs[first].shape[1]
        return (tensor[:, :n], tensor[:, n:]) if tensor.shape[1] > n else (tensor, None)

    return source, flatten, pack


def joint_block(last_only: bool):
    """``source``, ``flatten``, ``pack`` of a joint block taking ``hidden_states`` / ``encoder_hidden_states`` and
    returning ``(encoder_hidden_states, hidden_states)``: text tokens first, as the block returns them. A block
    whose text output is None (``last_only``: SD3's context_pre_only last block) is its image stream alone."""

    def source(args, kwargs):
        if last_only:
            return kwargs["hidden_states"]
        return torch.cat([kwargs["encoder_hidden_states"], kwargs["hidden_states"]], dim=1)

    def flatten(out):
        return out[1] if last_only else torch.cat([out[0], out[1]], dim=1)

    def pack(tensor, args, kwargs):
        if last_only:
            return None, tensor
        n = kwargs["encoder_hidden_states"].shape[1]
        return tensor[:, :n], tensor[:, n:]

    return source, flatten, pack
