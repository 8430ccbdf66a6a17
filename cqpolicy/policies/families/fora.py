"""``fora``: recompute every ``interval`` steps, reuse in between (FORA; DeepCache's uniform interval).

``attn1_interval`` / ``ff_interval`` give one unit type its own interval (a per-unit-type hand schedule such
as ``fora:attn1_interval=8,ff_interval=4``); refreshes stay in phase, every block alike.

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
    attn1_interval: int = 0  # attn1's own interval (0: ``interval``)
    ff_interval: int = 0  # ff's own interval (0: ``interval``)

    def __post_init__(self):
        for name in ("interval", "attn1_interval", "ff_interval"):
            if getattr(self, name) < (1 if name == "interval" else 0):
                raise ValueError(f"policy 'fora': {name} must be at least {1 if name == 'interval' else 0}, "
                                 f"got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"policy 'fora': warmup must be non-negative, got {self.warmup}")
        parse_units(self.unit, "fora", "unit")


@register("fora", ForaConfig)
class ForaPolicy(Policy):
    def __init__(self, config: ForaConfig = ForaConfig()):
        self.config = config
        self.units = parse_units(config.unit, "fora", "unit")
        own = {"attn1": config.attn1_interval, "ff": config.ff_interval}
        self.intervals = {u: own.get(u) or config.interval for u in self.units}

    def decide(self, query: UnitQuery) -> bool:
        if query.step < self.config.warmup:
            return True
        return (query.step - self.config.warmup) % self.intervals[query.unit] == 0


def interval_spec(interval: int, units: tuple[str, ...]) -> str:
    """``fora:interval=k`` over ``units`` (a model family's default units), naming them unless FORA's default."""
    own = "" if "+".join(units) == ForaConfig.unit else f",unit={'+'.join(units)}"
    return f"fora:interval={interval}{own}"
