"""``smoothcache``: a per-unit-type schedule calibrated from how fast each unit's output changes.

SmoothCache: A Universal Inference Acceleration Technique for Diffusion Transformers (Liu et al., 2024).

``prepare(model, settings)`` runs the uncached model once on ``calibration_samples`` samples and measures, per
unit type, the relative L1 error of reusing step i's output at step j, ``mean|o_j - o_i| / mean|o_i|``
(per row, averaged over rows and blocks). The schedule is built greedily: compute at step 0; after a computed
step i, reuse i+1, i+2, ... while the error stays within ``threshold`` and at most ``lookahead`` steps in a row;
the next step computes; the last step always computes. Sampling then follows that schedule exactly as the
``schedule`` policy would (``export_schedule`` writes it in SmoothCache's published JSON format).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cqpolicy.models.adapters import parse_units
from cqpolicy.policies import calibration
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.families.schedule import StaticSchedule, save_schedule
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class SmoothCacheConfig:
    threshold: float = 0.1  # largest relative L1 error a reuse may introduce (vs. the last computed output)
    lookahead: int = 3  # at most this many consecutive reuses after a computed step
    calibration_samples: int = 8  # samples in the uncached calibration run (two rows each with CFG)
    units: str = ""  # '+'-joined cache units, one schedule per unit type; '': the model family's default units

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"policy 'smoothcache': threshold must be a non-negative number, got {self.threshold}")
        if self.lookahead < 1:
            raise ValueError(f"policy 'smoothcache': lookahead must be at least 1, got {self.lookahead}")
        if self.calibration_samples < 1:
            raise ValueError(f"policy 'smoothcache': calibration_samples must be at least 1, "
                             f"got {self.calibration_samples}")
        parse_units(self.units, "smoothcache")


def relative_errors(outputs: dict, units: tuple[str, ...], lookahead: int) -> dict[str, torch.Tensor]:
    """Per unit type, ``err[i, d - 1]`` = error of reusing step i's output at step i + d (inf past the end).

    ``outputs`` is ``record_unit_outputs``'s ``{(block, unit): [steps, rows, ...]}``.
    """
    errors = {}
    for unit in units:
        per_block = [o for (_, u), o in sorted(outputs.items()) if u == unit]
        if not per_block:
            raise RuntimeError(f"policy 'smoothcache': the calibration run recorded no {unit!r} outputs")
        steps = per_block[0].shape[0]
        err = torch.full((steps, lookahead), math.inf, dtype=torch.float64)
        for d in range(1, min(lookahead, steps - 1) + 1):
            total = torch.zeros(steps - d, dtype=torch.float64)
            for o in per_block:
                o = o.reshape(o.shape[0], o.shape[1], -1)  # [steps, rows, features]
                prev, later = o[:-d], o[d:]
                ratio = (later - prev).abs().mean(-1) / prev.abs().mean(-1).clamp_min(1e-12)
                total += ratio.mean(-1).double()  # average over rows (both CFG halves)
            err[:steps - d, d - 1] = total / len(per_block)
        errors[unit] = err
    return errors


def greedy_schedule(err: torch.Tensor, threshold: float, lookahead: int) -> tuple[int, ...]:
    """0/1 per step from an ``err[i, d - 1]`` table (see ``relative_errors``)."""
    steps = err.shape[0]
    schedule = [0] * steps
    i = 0
    while i < steps:
        schedule[i] = 1
        j = i + 1
        while j < steps and j - i <= lookahead and float(err[i, j - i - 1]) <= threshold:
            j += 1  # reusing step i's output at step j stays within the threshold
        i = j
    schedule[-1] = 1  # the last step shapes the final image directly: always computed
    return tuple(schedule)


@register("smoothcache", SmoothCacheConfig)
class SmoothCachePolicy(Policy):
    static = True

    def __init__(self, config: SmoothCacheConfig = SmoothCacheConfig()):
        self.config = config
        self.units = parse_units(config.units, self.name)
        self.errors: dict[str, torch.Tensor] | None = None  # the current calibration's error tables
        self.static: StaticSchedule | None = None  # the current calibrated schedule
        self._calibrated: dict[tuple, tuple[dict, StaticSchedule]] = {}

    @property
    def schedule(self) -> dict:
        return self._require().schedule

    def prepare(self, model, settings) -> None:
        self.units = self.units or model.adapter.default_units
        key = (model.name, int(settings.steps), settings.scheduler, float(settings.guidance_scale))
        if key not in self._calibrated:  # calibrate once per setting; prepare is cheap afterwards
            outputs = calibration.record_unit_outputs(model, settings, self.units,
                                                      num_samples=self.config.calibration_samples)
            errors = relative_errors(outputs, self.units, self.config.lookahead)
            del outputs
            schedule = {(u, None): greedy_schedule(errors[u], self.config.threshold, self.config.lookahead)
                        for u in self.units}
            source = f"the schedule calibrated for {settings.steps} steps"
            self._calibrated[key] = errors, StaticSchedule(schedule, "smoothcache", source)
            self.calibration_images = self.config.calibration_samples
        self.errors, self.static = self._calibrated[key]

    def _require(self) -> StaticSchedule:
        if self.static is None:
            raise RuntimeError("policy 'smoothcache': not calibrated yet; call policy.prepare(model, settings) "
                               "before sampling (evaluate does this)")
        return self.static

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self._require().reset(num_steps, num_blocks)

    def decide(self, query: UnitQuery) -> bool:
        return self._require().decide(query)

    def export_schedule(self, path: str | os.PathLike) -> Path:
        """Write the calibrated schedule in SmoothCache's published JSON format (loadable by ``schedule``)."""
        return save_schedule(self._require().schedule, path)
