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
