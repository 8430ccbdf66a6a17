"""Where the cache units of a model are.

A *cache unit* is a submodule whose output the runtime may replace by a cached one: for diffusers DiT
blocks (``BasicTransformerBlock`` with adaLN-zero) the self-attention ``attn1`` and the feed-forward ``ff``
(their outputs come before the adaLN gate and the residual, so a reused output is still gated by the
current step's conditioning), or the whole ``block`` (its residual ``output - input`` is cached).
Other families (UNets) add their own ``find_cache_units`` entry here; the runtime only sees CacheUnits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_NAMES = ("attn1", "ff", "block")


@dataclass(frozen=True)
class CacheUnit:
    block: int
    name: str
    module: torch.nn.Module
    residual: bool  # cache output - first input (whole blocks) rather than the output itself


class NoCacheUnitsError(ValueError):
    """The model has no blocks the runtime recognises."""


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise NoCacheUnitsError(f"{type(model).__name__} has no transformer_blocks: no cache units to hook "
                                f"(supported: diffusers DiT-style transformers)")
    return list(blocks)


def find_cache_units(model: torch.nn.Module, names: tuple[str, ...]) -> list[CacheUnit]:
    unknown = set(names) - set(UNIT_NAMES)
    if unknown:
        raise ValueError(f"unknown cache unit(s) {sorted(unknown)}; choose from {', '.join(UNIT_NAMES)}")
    units = []
    for i, block in enumerate(transformer_blocks(model)):
        for name in names:
            if name == "block":
                units.append(CacheUnit(i, name, block, residual=True))
                continue
            module = getattr(block, name, None)
            if module is None:
                raise NoCacheUnitsError(f"block {i} ({type(block).__name__}) has no {name!r} submodule")
            units.append(CacheUnit(i, name, module, residual=False))
    return units


def forward_from_block(model: torch.nn.Module, start: int, hidden_states: torch.Tensor, timestep: torch.Tensor,
                       class_labels: torch.Tensor) -> torch.Tensor:
    """The rest of a DiT forward: blocks ``start..L-1`` on ``hidden_states`` (block ``start``'s input), then
    the adaLN-zero output head and unpatchify; equals ``model(...).sample`` when fed block ``start``'s input.

    Probes use it to re-run a step from one unit onward instead of the whole model.
    """
    import torch.nn.functional as F

    for block in transformer_blocks(model)[start:]:
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


def parse_units(text: str, family: str, field: str = "units") -> tuple[str, ...]:
    """``'attn1+ff'`` -> ``('attn1', 'ff')``; one-line ValueError naming the policy family otherwise."""
    parts = tuple(text.split("+"))
    if any(p not in UNIT_NAMES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"policy {family!r}: {field} must be distinct '+'-joined names from "
                         f"{', '.join(UNIT_NAMES)}, got {text!r}")
    return parts
