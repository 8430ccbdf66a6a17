"""``phased``: a non-uniform static schedule, an interval per phase, depth band and unit type.

The search space of offline-searched schedules (ECAD's step x block x component grids, ProCache / SODA's
non-uniform intervals) in a handful of numbers a search can draw:

- the first ``warmup`` steps and the last ``tail`` steps compute everything;
- between them, steps before ``split`` (a fraction of the run) use the ``early`` interval, the rest ``late``;
  each phase starts with a refresh (every unit computes at its first step);
- blocks at depth >= ``depth`` (a fraction of the blocks) add ``deep`` to the interval (1.0: no deep band);
- ``offsets`` adds a per-unit-type amount, '/'-joined in the order of ``unit`` (``unit=attn1+ff,offsets=0/1``:
  ff one step longer than attn1).

Every sample and batch gets the same decisions: a ``forecast`` can be fitted to it (``train forecast --schedule``).
``phased:early=k`` with nothing else is ``fora:interval=k``.
"""
from __future__ import annotations

from dataclasses import dataclass

from cqpolicy.models.adapters import parse_units
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class PhasedConfig:
    early: int = 2  # interval before ``split``
    late: int = 2  # interval from ``split`` on
    split: float = 1.0  # where the late phase starts, as a fraction of the steps (1.0: one phase)
    warmup: int = 0  # first steps computed fully
    tail: int = 0  # last steps computed fully
    depth: float = 1.0  # blocks at index >= depth * num_blocks are the deep band (1.0: none)
    deep: int = 0  # added to the deep band's interval
    unit: str = ""  # '+'-joined cache units; '': the model family's default units
    offsets: str = ""  # '/'-joined per-unit additions in ``unit``'s order ('': none)

    def __post_init__(self):
        for name in ("early", "late"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy 'phased': {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "tail", "deep"):
            if getattr(self, name) < 0:
                raise ValueError(f"policy 'phased': {name} must be non-negative, got {getattr(self, name)}")
        for name in ("split", "depth"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"policy 'phased': {name} must be in [0, 1], got {getattr(self, name)}")
        units = parse_units(self.unit, "phased", "unit")
        offsets = self.offset_values()
        if offsets and len(offsets) != len(units):
            raise ValueError(f"policy 'phased': offsets {self.offsets!r} needs one entry per unit of {self.unit!r}")

    def offset_values(self) -> tuple[int, ...]:
        if not self.offsets:
            return ()
        try:
            values = tuple(int(v) for v in self.offsets.split("/"))
        except ValueError:
            values = (-1,)
        if any(v < 0 for v in values):
            raise ValueError(f"policy 'phased': offsets must be '/'-joined non-negative ints, got {self.offsets!r}")
        return values


@register("phased", PhasedConfig)
class PhasedPolicy(Policy):
    static = True

    def __init__(self, config: PhasedConfig = PhasedConfig()):
        self.config = config
        self.units = parse_units(config.unit, "phased", "unit")
        self.offset = dict(zip(self.units, config.offset_values()))
        self.reset(None, 0)

    def reset(self, num_steps, num_blocks) -> None:
        self._phases: tuple[int, int, int] | None = None  # (late phase start, first tail step, deep band start)

    def _layout(self, query: UnitQuery) -> tuple[int, int, int]:
        if self._phases is None:
            c = self.config
            if query.num_steps is None and (c.split < 1.0 or c.tail):
                raise ValueError("policy 'phased': the step count is unknown here; run it through cqpolicy's "
                                 "sampler or cqpolicy.enable on the pipeline")
            steps = query.num_steps or 0
            late = max(c.warmup, round(c.split * steps)) if c.split < 1.0 else 1 << 30
            self._phases = (late, steps - c.tail if c.tail else 1 << 30, round(c.depth * query.num_blocks))
        return self._phases

    def decide(self, query: UnitQuery) -> bool:
        c, step = self.config, query.step
        late, tail, deep = self._layout(query)
        if step < c.warmup or step >= tail:
            return True
        start, interval = (late, c.late) if step >= late else (c.warmup, c.early)
        interval += (c.deep if query.block >= deep else 0) + self.offset.get(query.unit, 0)
        return (step - start) % interval == 0
