"""``taylorseer``: compute every ``interval`` steps and *forecast* the skipped steps with a Taylor expansion.

At each computed step the policy keeps, per (block, unit), the last ``order + 1`` computed outputs (float32,
detached) and their step indices. At a reused step ``s`` it returns

    f(s) ~ f(s0) + D1 (s - s0) + D2 (s - s0)^2 / 2

with ``s0`` the last computed step, ``D1 = f[s0, s1]`` (first divided difference over step index) and
``D2 = 2 f[s0, s1, s2]`` (second divided difference), i.e. the paper's backward finite-difference derivative
estimates, generalised to the unequal spacing a warmup leaves. An order-1 forecast is exact for outputs
linear in the step. With fewer than ``order + 1`` stored outputs the forecast drops to the order the history
supports (one output: plain reuse).

``f(s0)`` is the runtime's cached tensor (so the cache format's precision loss is what the model sees);
the differences come from the float32 history, which the policy holds itself: ``history_nbytes`` reports it
and the runtime adds it to ``cache_bytes`` (through ``state_nbytes``).

TaylorSeer: From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers (Liu et al., 2025).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register

from cqpolicy.models.adapters import parse_units


@dataclass(frozen=True)
class TaylorSeerConfig:
    interval: int = 3  # compute at steps where (step - warmup) % interval == 0, forecast in between
    order: int = 1  # Taylor order of the forecast: 1 (linear) or 2 (quadratic)
    warmup: int = 1  # the first `warmup` steps always compute
    units: str = ""  # '+'-joined cache units (attn1, ff, block, layer); '': the model family's default units

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"policy 'taylorseer': interval must be at least 1, got {self.interval}")
        if self.order not in (1, 2):
            raise ValueError(f"policy 'taylorseer': order must be 1 or 2, got {self.order}")
        if self.warmup < 0:
            raise ValueError(f"policy 'taylorseer': warmup must be non-negative, got {self.warmup}")
        parse_units(self.units, "taylorseer")


def taylor_forecast(history: list[tuple[int, torch.Tensor]], step: int, order: int,
                    base: torch.Tensor | None = None) -> torch.Tensor:
    """Forecast the value at ``step`` from ``history`` = [(step_i, value_i)], newest last, float32.

    Uses the newest ``min(order, len(history) - 1)`` + 1 points; ``base`` (default: the newest value)
    replaces ``f(s0)`` in the expansion.
    """
    order = min(order, len(history) - 1)
    s0, f0 = history[-1]
    out = (f0 if base is None else base).float()
    if order < 1:
        return out.clone()
    s1, f1 = history[-2]
    d01 = (f0 - f1) / (s0 - s1)
    ds = float(step - s0)
    out = out + d01 * ds
    if order >= 2:
        s2, f2 = history[-3]
        d12 = (f1 - f2) / (s1 - s2)
        d012 = (d01 - d12) / (s0 - s2)
        out = out + d012 * ds * ds  # D2 / 2 * ds^2 with D2 = 2 f[s0, s1, s2]
    return out


@register("taylorseer", TaylorSeerConfig)
class TaylorSeerPolicy(Policy):
    def __init__(self, config: TaylorSeerConfig = TaylorSeerConfig()):
        self.config = config
        self.units = parse_units(config.units, self.name)
        self.reset(None, 0)

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self._history: dict[tuple[int, str], deque] = {}

    def decide(self, query: UnitQuery) -> bool:
        if query.step < self.config.warmup:
            return True
        return (query.step - self.config.warmup) % self.config.interval == 0

    def observe(self, query: UnitQuery, output: torch.Tensor) -> None:
        history = self._history.setdefault((query.block, query.unit), deque(maxlen=self.config.order + 1))
        if history and history[-1][0] == query.step:
            history.pop()  # the unit ran twice in one step: keep the newest
        history.append((query.step, output.detach().to(torch.float32, copy=True)))

    def reuse(self, query: UnitQuery, cached: torch.Tensor) -> torch.Tensor:
        history = self._history.get((query.block, query.unit))
        if not history or history[-1][1].shape != cached.shape:
            return cached  # no usable history (cannot happen within one call): plain reuse
        order = min(self.config.order, len(history) - 1)
        self.executed_macs += (order * (order + 1) // 2 + order) * cached.numel()  # differences, then the series
        forecast = taylor_forecast(list(history), query.step, self.config.order, base=cached)
        return forecast.to(cached.dtype)

    @property
    def state_nbytes(self) -> int:
        return self.history_nbytes

    @property
    def history_nbytes(self) -> int:
        """Bytes of the float32 output history the forecasts use (held outside the runtime's cache)."""
        return sum(v.numel() * v.element_size() for h in self._history.values() for _, v in h)
