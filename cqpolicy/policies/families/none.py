"""``none``: always compute. The hooks still run (so its cost is the runtime's own overhead), nothing is stored."""
from __future__ import annotations

from dataclasses import dataclass

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class NoneConfig:
    pass


@register("none", NoneConfig)
class NonePolicy(Policy):

    def __init__(self, config: NoneConfig = NoneConfig()):
        self.config = config

    def decide(self, query: UnitQuery) -> bool:
        return True

    @property
    def caches(self) -> bool:
        return False
