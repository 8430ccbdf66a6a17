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
    unit: str = ""  # '+'-joined cache units (attn1, ff, block, layer); '': the model family's default units
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
    static = True

    def __init__(self, config: ForaConfig = ForaConfig()):
        self.config = config
        self.units = parse_units(config.unit, "fora", "unit")
        self.own = {"attn1": config.attn1_interval, "ff": config.ff_interval}  # 0: the common interval

    def decide(self, query: UnitQuery) -> bool:
        if query.step < self.config.warmup:
            return True
        return (query.step - self.config.warmup) % (self.own.get(query.unit) or self.config.interval) == 0


def interval_spec(interval: int, units: tuple[str, ...]) -> str:
    """``fora:interval=k`` over ``units``, naming them unless they are the DiT's (the specs of earlier tables)."""
    own = "" if "+".join(units) == "attn1+ff" else f",unit={'+'.join(units)}"
    return f"fora:interval={interval}{own}"
