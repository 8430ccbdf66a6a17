"""``teacache``: skip blocks 1..L-1 while block 0's input has changed little since the last full step.

TeaCache / First-Block-Cache style, decided once per step at block 0 and applied to every later block:

* **Indicator.** The input of the first hooked unit of block 0 at each step. With ``unit=attn1`` (or
  ``attn1+ff``) that is ``attn1``'s input, i.e. the timestep-modulated input ``LN(x) * (1 + scale) + shift``
  that TeaCache uses; with ``unit=block`` (the default) it is the hidden states entering block 0 (the runtime
  does not expose the adaLN conditioning to a block-level query, so the modulation cannot be recomputed
  there). With ``unit=ff`` it is block 0's modulated MLP input.
* **Accumulation.** As TeaCache: at every step the relative L1 change ``mean|x_s - x_{s-1}| / mean|x_{s-1}|``
  against the previous step's indicator is added to an accumulator that was zeroed at the last step where
  everything computed; so the accumulator measures the drift since that full step. (TeaCache's
  model-specific polynomial rescaling of the change is not applied: its coefficients are fitted per model.)
* **Decision.** Steps before ``warmup`` and the first step compute. Later, while the accumulator is below
  ``threshold`` and fewer than ``max_reuse`` steps in a row were skipped, blocks 1..L-1 reuse their cached
  units; otherwise everything computes and the accumulator resets. Block 0 always computes (its input is
  the indicator, as in First-Block-Cache). One decision per step covers both classifier-free-guidance halves.

TeaCache: Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model (Liu et al., 2025).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register
from cqpolicy.policies.signals import relative_l1

from cqpolicy.models.adapters import parse_units


@dataclass(frozen=True)
class TeaCacheConfig:
    threshold: float = 0.1  # reuse while the accumulated relative L1 change of block 0's input stays below this
    max_reuse: int = 4  # at most this many consecutive reused steps (0: never reuse)
    warmup: int = 1  # the first `warmup` steps always compute
    unit: str = ""  # '+'-joined cache units skipped in blocks 1..L-1; '': the model's whole blocks (DiT block)

    def __post_init__(self):
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"policy 'teacache': threshold must be a finite non-negative number, got {self.threshold}")
        if self.max_reuse < 0:
            raise ValueError(f"policy 'teacache': max_reuse must be non-negative, got {self.max_reuse}")
        if self.warmup < 0:
            raise ValueError(f"policy 'teacache': warmup must be non-negative, got {self.warmup}")
        parse_units(self.unit, "teacache", "unit")


@register("teacache", TeaCacheConfig)
class TeaCachePolicy(Policy):
    def __init__(self, config: TeaCacheConfig = TeaCacheConfig()):
        self.config = config
        self.units = parse_units(config.unit, "teacache", "unit")
        self.reset(None, 0)

    units_from = "block_units"

    def bind(self, adapter) -> None:
        self.units = self.units or adapter.block_units

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self._previous: torch.Tensor | None = None  # the indicator at the previous step
        self.accumulated = 0.0  # summed relative L1 change since the last full step
        self._streak = 0  # consecutive reused steps
        self._step: int | None = None  # the step the current decision belongs to
        self._compute = True  # this step's decision for blocks 1..L-1

    def decide(self, query: UnitQuery) -> bool:
        if query.block == 0:
            if self._step != query.step:  # the first block-0 unit of this step: decide for the whole step
                self._step = query.step
                self._compute = self._decide_step(query)
            return True
        return self._compute if self._step == query.step else True

    def _decide_step(self, query: UnitQuery) -> bool:
        x = query.inputs.detach()
        previous, self._previous = self._previous, x.clone()  # clone: the caller may reuse the buffer
        if query.step < self.config.warmup or previous is None or previous.shape != x.shape:
            return self._full_step()
        self.accumulated += float(relative_l1(x, previous))
        if self.accumulated < self.config.threshold and self._streak < self.config.max_reuse:
            self._streak += 1
            return False
        return self._full_step()

    def _full_step(self) -> bool:
        self.accumulated = 0.0
        self._streak = 0
        return True
