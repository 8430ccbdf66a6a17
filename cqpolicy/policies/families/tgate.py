"""``tgate``: compute cross-attention until a gate step, then reuse its last output for the rest of sampling.

Cross-attention to the prompt settles early in sampling (the semantics are laid out in the first steps), so
T-GATE caches its output after the gate and skips it from then on; every other unit computes. The gate is a
fraction of the steps, so one spec fits any step count. Only families with cross-attention units have it (PixArt,
Stable Diffusion); SD3 and FLUX attend to the prompt jointly with the image, so there is nothing to gate.

T-GATE: Temporally Gating Attention to Accelerate Diffusion Model for Free (Zhang et al., 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class TGateConfig:
    gate: float = 0.4  # the fraction of steps computed before cross-attention is cached (paper: 10 of 25 steps)

    def __post_init__(self):
        if not 0.0 < self.gate <= 1.0:
            raise ValueError(f"policy 'tgate': gate must lie in (0, 1], got {self.gate}")


@register("tgate", TGateConfig)
class TGatePolicy(Policy):
    static = True
    units_from = "cross_attention_units"

    def __init__(self, config: TGateConfig = TGateConfig()):
        self.config = config
        self.units = ()
        self._gate_step: int | None = None

    def bind(self, adapter) -> None:
        if not adapter.cross_attention_units:
            raise ValueError(f"policy 'tgate' needs cross-attention units; {adapter.model_class} has none (its "
                             f"prompt is attended jointly with the image)")
        self.units = adapter.cross_attention_units

    def begin_step(self, step: int, num_steps: int | None, timestep: float) -> None:
        if num_steps is None:
            raise ValueError("policy 'tgate' needs the step count: run it through the sampler or a pipeline")
        self._gate_step = max(1, round(self.config.gate * num_steps))

    def decide(self, query: UnitQuery) -> bool:
        return query.step < self._gate_step
