"""``deepcache``: on a UNet, refresh every ``interval`` steps; in between only the shallow path down to the skip
branch ``branch`` recomputes, and every layer deeper than it reuses its last output.

Layers are the UNet's resnet and attention layers (units ``layer``); a layer's depth is its down / up level, the
mid block deepest (``cqpolicy.models.adapters``). A reused layer returns its cached output whatever its input, so
the deep path hands the shallow up block the feature of the last refresh, as DeepCache does; the down- and
upsamplers between reused layers still run (they are not cache units) and are counted in the MACs.

DeepCache: Accelerating Diffusion Models for Free (Ma, Fang and Wang, CVPR 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class DeepCacheConfig:
    interval: int = 3  # full refresh at steps where step % interval == 0
    branch: int = 0  # the deepest level that still recomputes between refreshes (0: only the outermost)

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"policy 'deepcache': interval must be at least 1, got {self.interval}")
        if self.branch < 0:
            raise ValueError(f"policy 'deepcache': branch must be non-negative, got {self.branch}")


@register("deepcache", DeepCacheConfig)
class DeepCachePolicy(Policy):
    static = True
    units = ("layer",)

    def __init__(self, config: DeepCacheConfig = DeepCacheConfig()):
        self.config = config
        self.depths: list[int] = []

    def attach(self, model) -> None:
        from cqpolicy.models.adapters import adapter_for

        depths = adapter_for(model).depths(model)
        if depths is None:
            raise ValueError(f"policy 'deepcache' needs a UNet (its branch is a UNet level); "
                             f"{type(model).__name__} has none")
        if self.config.branch >= max(depths):
            raise ValueError(f"policy 'deepcache': branch {self.config.branch} leaves nothing to reuse (levels "
                             f"0..{max(depths)}, the mid block deepest)")
        self.depths = depths

    def decide(self, query: UnitQuery) -> bool:
        return query.step % self.config.interval == 0 or self.depths[query.block] <= self.config.branch
