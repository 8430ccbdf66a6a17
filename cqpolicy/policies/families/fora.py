"""``fora``: recompute every ``interval`` steps, reuse in between (FORA; DeepCache's uniform interval).

FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al., 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

from cqpolicy.models.adapters import parse_units
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class ForaConfig:
    interval: int = 2  # compute at steps where (step - warmup) % interval == 0
    warmup: int = 0  # steps computed fully before caching starts
    unit: str = "attn1+ff"  # '+'-joined cache units: attn1, ff, block

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"policy 'fora': interval must be at least 1, got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"policy 'fora': warmup must be non-negative, got {self.warmup}")
        parse_units(self.unit, "fora", "unit")


@register("fora", ForaConfig)
class ForaPolicy(Policy):
    def __init__(self, config: ForaConfig = ForaConfig()):
        self.config = config
        self.units = parse_units(config.unit, "fora", "unit")

    def decide(self, query: UnitQuery) -> bool:
        if query.step < self.config.warmup:
            return True
        return (query.step - self.config.warmup) % self.config.interval == 0
